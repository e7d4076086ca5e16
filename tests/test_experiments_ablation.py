"""The ablation experiment (Fig. 3 of Geng et al.) in quick mode: files, the grid asked for,
accuracies that are counts of validation images, tables read off the recorded runs, the same seed
giving the same numbers, and NPG with k = 1, λ = 1 training exactly as JFB."""
import json

import numpy as np
import pytest

from deqref.data import digits
from deqref.experiments import EXPERIMENTS
from deqref.experiments.ablation import MODES, row, sign_test, train_one


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    returned = EXPERIMENTS["ablation"].run(out, seed=0, mode="quick")
    return json.loads((out / "ablation.json").read_text()), out, returned


def _all_runs(data):
    yield data["implicit"]["runs"]
    for r in data["rows"]:
        yield r["upg"]["runs"]
        yield r["npg"]["runs"]


def test_files_and_summary(quick):
    data, out, returned = quick
    assert (out / "ablation.png").stat().st_size > 5000
    assert json.loads(json.dumps(returned)) == data                  # what run returns is what it wrote
    assert data["setting"]["mode"] == "quick"
    mod = EXPERIMENTS["ablation"]
    assert "Figure 3 of Geng" in mod.__doc__.splitlines()[0]
    text = mod.summary(data)                                         # works from the JSON alone
    assert len(text.splitlines()) == 2 + len(data["rows"]) + 2


def test_grid_is_the_one_requested(quick):
    data = quick[0]
    cfg = MODES["quick"]
    # every k for each λ of the k-sweep, every λ at the paper's k; nothing else, each point once
    expected = {(k, lam) for lam in cfg["lams_for_k"] for k in cfg["ks"]}
    expected |= {(cfg["k_for_lam"], lam) for lam in cfg["lams"]}
    got = [(r["k"], r["lam"]) for r in data["rows"]]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    assert [tuple(p) for p in data["grid"]["points"]] == got
    assert data["grid"]["ks"] == cfg["ks"] and data["grid"]["lams"] == cfg["lams"]
    seeds = data["setting"]["seeds"]
    assert seeds == list(range(cfg["n_seeds"])) and len(seeds) >= 2
    for runs in _all_runs(data):
        assert [r["seed"] for r in runs] == seeds
    with pytest.raises(KeyError, match="not on the grid"):
        row(data, 99, 0.5)


def test_accuracies_are_counts_and_tables_match_runs(quick):
    data = quick[0]
    s = data["setting"]
    n_val = s["n_val"]
    for runs in _all_runs(data):
        for r in runs:
            acc = np.array(r["val_metric"])
            assert len(acc) == s["epochs"]
            assert np.all(np.isfinite(acc)) and np.all((acc >= 0) & (acc <= 1))
            # accuracy = (correct images) / n_val: an integer count, to rounding
            assert np.allclose(acc * n_val, np.round(acc * n_val), rtol=0, atol=1e-9)
            assert all(np.isfinite(r["train_loss"]))
    for r in [data["implicit"]] + [r[m] for r in data["rows"] for m in ("upg", "npg")]:
        final = np.array([x["val_metric"][-1] for x in r["runs"]])
        best = np.array([max(x["val_metric"]) for x in r["runs"]])
        summ = r["summary"]
        assert summ["acc_per_seed"] == final.tolist()
        assert summ["acc_mean"] == pytest.approx(final.mean(), abs=1e-15)
        assert summ["acc_std"] == pytest.approx(final.std(ddof=1), abs=1e-15)
        assert summ["best_mean"] == pytest.approx(best.mean(), abs=1e-15)
        # 10 classes, chance 10 %: two epochs of any of these gradients learn far more
        assert summ["acc_mean"] > 0.5
    diffs = []
    for r in data["rows"]:
        d = np.array(r["upg"]["summary"]["acc_per_seed"]) - np.array(r["npg"]["summary"]["acc_per_seed"])
        assert r["upg_minus_npg"]["per_seed"] == pytest.approx(d.tolist(), abs=1e-15)
        diffs += d.tolist()
    p = data["pooled"]
    assert p["n"] == len(diffs) and p["mean"] == pytest.approx(np.mean(diffs), abs=1e-15)
    assert p["upg_higher"] + p["npg_higher"] + p["equal"] == p["n"]


def test_sign_test_against_the_binomial_sum():
    """The p-value against the exact binomial tail written out (2 · P(X ≤ min(a, b)), X ~ B(a + b, 1/2))."""
    import math
    for a, b in ((4, 12), (0, 3), (5, 5), (7, 1), (0, 0)):
        n = a + b
        ref = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n) if n else 1.0
        assert sign_test(a, b) == pytest.approx(ref, rel=1e-12)


def test_same_seed_same_numbers_and_npg_11_is_jfb(quick):
    """Re-train one grid point from scratch: bit-for-bit the recorded run. And JFB (∂F/∂θ g at h*)
    trained on the same seed gives exactly NPG's A_{1,1} run: the same gradient, the same numbers."""
    data = quick[0]
    seed = data["setting"]["seeds"][-1]
    i = data["setting"]["seeds"].index(seed)
    ds = digits(data["setting"]["seed"])
    k, lam = data["rows"][-1]["k"], data["rows"][-1]["lam"]
    again = train_one(ds, "upg", {"k": k, "lam": lam}, seed, mode="quick")
    rec = row(data, k, lam)["upg"]["runs"][i]
    for key in ("train_loss", "val_loss", "val_metric", "forward_iters"):
        assert again[key] == rec[key], key
    jfb = train_one(ds, "jfb", {}, seed, mode="quick")
    npg11 = row(data, 1, 1.0)["npg"]["runs"][i]
    for key in ("train_loss", "val_loss", "val_metric"):
        assert jfb[key] == npg11[key], key


def test_noise_floor_and_bad_mode(quick, tmp_path):
    data = quick[0]
    k1 = [r for r in data["rows"] if r["k"] == 1]
    acc = np.array([r["npg"]["summary"]["acc_per_seed"] for r in k1])
    assert data["noise_floor"]["max"] == pytest.approx((acc.max(0) - acc.min(0)).max(), abs=1e-15)
    with pytest.raises(ValueError, match="mode"):
        EXPERIMENTS["ablation"].run(tmp_path, seed=0, mode="huge")

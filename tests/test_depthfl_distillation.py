"""DepthFL (``algorithm: depthfl``): depth-wise averaging plus mutual self-distillation among the
exits a client holds, L = Σ_i [CE_i + w·T²/(n−1)·Σ_{j≠i} KL(p_j ‖ p_i)] with detached teachers;
and ``depthwise_avg``, the plain depth-wise averaging that ``depthfl`` named before."""
from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from helpers import assert_all_columns_identical, same_bits


# ------------------------------------------------------------------------------ the loss by hand
def test_two_exits_by_hand():
    """z₁ = (0, 0): p₁ = (1/2, 1/2); z₂ = (ln 3, 0): p₂ = (3/4, 1/4); label 0.
    CE₁ = ln 2 = 0.6931472, CE₂ = −ln(3/4) = 0.2876821,
    KL(p₂‖p₁) = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.3040988 − 0.1732868 = 0.1308120,
    KL(p₁‖p₂) = 1/2·ln(2/3) + 1/2·ln 2 = −0.2027326 + 0.3465736 = 0.1438410,
    L = 0.6931472 + 0.2876821 + 0.1308120 + 0.1438410 = 1.2554823 (n − 1 = 1, w = T = 1).
    Gradients with the teachers detached: z₁ gets (p₁ − onehot) + (p₁ − p₂) = (−3/4, 3/4);
    z₂ gets (p₂ − onehot) + (p₂ − p₁) = (−1/4, 1/4) + (1/4, −1/4) = (0, 0)."""
    from fedmpi.algorithms.depthfl import mutual_distillation

    z1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64, requires_grad=True)
    loss = mutual_distillation(1.0)([z1, z2], torch.tensor([0]))
    assert loss.item() == pytest.approx(1.2554823, abs=1e-6)
    loss.backward()
    assert z1.grad[0].tolist() == pytest.approx([-0.75, 0.75], abs=1e-12)
    # a teacher that passed gradient would add d KL(p₂‖p₁)/dz₂ ≠ 0 here
    assert z2.grad[0].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def _softmax(row, temperature):
    top = max(row)
    e = [math.exp((v - top) / temperature) for v in row]
    return [v / sum(e) for v in e]


def reference_loss(exits, labels, weight, temperature, eps):
    """The paper's loss in plain Python floats: per exit i, the batch mean of −ln p_i[y] plus
    weight·T²/(n−1) times, per other exit j, the batch mean of Σ_c t_c·(ln t_c − ln s_c) with
    t = softmax(z_j/T) + eps and s = softmax(z_i/T)."""
    n, batch = len(exits), len(labels)
    total = 0.0
    for i in range(n):
        ce = sum(-math.log(_softmax(exits[i][b], 1.0)[labels[b]]) for b in range(batch)) / batch
        kd = 0.0
        for j in range(n):
            if j == i:
                continue
            for b in range(batch):
                t = [p + eps for p in _softmax(exits[j][b], temperature)]
                s = _softmax(exits[i][b], temperature)
                kd += sum(tc * (math.log(tc) - math.log(sc)) for tc, sc in zip(t, s)) / batch
        total += ce + weight * temperature ** 2 * kd / (n - 1)
    return total


EXITS = [[[2.0, -1.0, 0.5, 0.0], [0.1, 0.3, -0.2, 1.5]],      # exit 1: 2 samples, 4 classes
         [[1.0, 0.0, 0.0, -2.0], [-1.0, 2.5, 0.0, 0.3]],      # exit 2
         [[0.0, 3.0, -1.0, 0.2], [0.7, -0.4, 1.1, 0.0]]]      # exit 3
LABELS = [0, 3]


@pytest.mark.parametrize("weight,temperature,eps", [(1.0, 1.0, 0.0),     # the paper
                                                    (0.5, 3.0, 0.0),     # another weight and T
                                                    (1.0, 1.0, 1e-7)])   # the authors' teacher + 1e-7
def test_three_exits_against_plain_math(weight, temperature, eps):
    from fedmpi.algorithms.depthfl import mutual_distillation

    outputs = [torch.tensor(z, dtype=torch.float64) for z in EXITS]
    got = mutual_distillation(weight, temperature, eps)(outputs, torch.tensor(LABELS)).item()
    assert got == pytest.approx(reference_loss(EXITS, LABELS, weight, temperature, eps), rel=1e-12)
    # and it is more than the exits' cross-entropies: the distillation term is there
    plain = reference_loss(EXITS, LABELS, 0.0, 1.0, 0.0)
    assert got > plain + 0.1 * weight


def test_agreeing_exits_add_nothing():
    """Three exits with the same logits: every KL is 0, L = 3·CE = 3·(−ln(3/4)) for z = (ln 3, 0)."""
    from fedmpi.algorithms.depthfl import mutual_distillation

    z = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    loss = mutual_distillation(1.0)([z, z.clone(), z.clone()], torch.tensor([0]))
    assert loss.item() == pytest.approx(3 * 0.2876821, abs=1e-6)


def test_one_exit_is_plain_cross_entropy():
    """A client holding one exit has nothing to distil: CE alone, −ln(3/4) for z = (ln 3, 0)."""
    from fedmpi.algorithms.depthfl import mutual_distillation

    z = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert mutual_distillation(1.0)([z], torch.tensor([0])).item() == pytest.approx(0.2876821, abs=1e-6)


def _depthfl(*sets):
    from fedmpi.algorithms import ModelInfo, build_algorithm
    from fedmpi.models import build_model, maskable_parameter_names
    from fedmpi.models.flops import layer_flops

    cfg = load_config(None, ["algorithm=depthfl", "model=multiexit_vgg_small", "clients.total=9",
                             "clients.per_round=6", *sets])
    full = build_model("multiexit_vgg_small", (1, 28, 28), 10)
    shapes = {n: tuple(t.shape) for n, t in full.state_dict().items() if t.is_floating_point()}
    info = ModelInfo(shapes, maskable_parameter_names(full), layer_flops(full, (1, 28, 28)), num_clients=9,
                     model="multiexit_vgg_small", input_shape=(1, 28, 28), num_classes=10)
    return build_algorithm(cfg, info)


def test_level_1_tier_trains_the_trainers_cross_entropy_and_deeper_tiers_distil():
    """tiers.levels [1, 2, 3]: the level-1 tier gets no objective of its own (the trainer's
    cross-entropy, as depth-wise averaging); levels 2 and 3 get the distillation; kd off or a zero
    weight: nobody does."""
    alg = _depthfl()
    assert alg.objective_for(1, 0) is None
    assert callable(alg.objective_for(1, 1)) and callable(alg.objective_for(1, 2))
    for off in ("depthfl.kd=false", "depthfl.kd_weight=0"):
        alg = _depthfl(off)
        assert [alg.objective_for(1, t) for t in range(3)] == [None, None, None], off


def test_authors_rampup_by_hand():
    """exp(−5·(1 − min(r−1, 300)/300)²): round 1 e⁻⁵ = 0.006737947, round 151 e^(−5/4) =
    0.2865048, from round 301 on 1; with no ramp-up the weight itself every round."""
    from fedmpi.algorithms.depthfl import kd_weight_at

    assert kd_weight_at(1, 1.0, 300) == pytest.approx(0.006737947, rel=1e-7)
    assert kd_weight_at(151, 1.0, 300) == pytest.approx(0.2865048, rel=1e-6)
    assert kd_weight_at(301, 1.0, 300) == kd_weight_at(1000, 1.0, 300) == 1.0
    assert kd_weight_at(151, 0.5, 300) == pytest.approx(0.5 * 0.2865048, rel=1e-6)
    assert kd_weight_at(1, 0.7, 0) == kd_weight_at(500, 0.7, 0) == 0.7


def test_the_objective_uses_the_rounds_weight():
    """Under the ramp-up, round 1's loss is CE + e⁻⁵·KD (two exits of the hand example above:
    0.9808293 + 0.006737947·0.2746530) and round 301's CE + KD."""
    alg = _depthfl("depthfl.kd_rampup_rounds=300")
    z1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    ce, kd = 0.6931472 + 0.2876821, 0.1308120 + 0.1438410
    assert alg.objective_for(1, 1)([z1, z2], y).item() == pytest.approx(ce + 0.006737947 * kd, abs=1e-6)
    assert alg.objective_for(301, 1)([z1, z2], y).item() == pytest.approx(ce + kd, abs=1e-6)


@pytest.mark.parametrize("setting,key", [("depthfl.kd_weight=-1", "depthfl.kd_weight"),
                                         ("depthfl.kd_temperature=0", "depthfl.kd_temperature"),
                                         ("depthfl.kd_rampup_rounds=-5", "depthfl.kd_rampup_rounds"),
                                         ("depthfl.teacher_epsilon=1", "depthfl.teacher_epsilon"),
                                         ("local.loss=bce_onehot", "local.loss")])
def test_bad_settings_name_their_key(setting, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=depthfl", "model=multiexit_vgg", setting])
    assert key in str(err.value)


# ------------------------------------------------------------------------------ end to end (tiny)
# the plain method exactly as ``algorithm: depthfl`` was before it became DepthFL proper
PLAIN_DEPTHWISE = textwrap.dedent("""
    import sys
    from fedmpi.algorithms.heterogeneous import TieredAlgorithm
    from fedmpi.cli import main

    class PlainDepthwise(TieredAlgorithm):
        name = "plain_depthwise"
        label = "plain depth-wise averaging"
        doc = "tests/test_depthfl_distillation.py"

        def variant(self, tier):
            return {"level": int(self.cfg["tiers"]["levels"][tier])}

    sys.exit(main(sys.argv[1:]))
""")


def test_depthwise_avg_is_the_plain_method_bit_for_bit(tiered_runs):
    _, plain = tiered_runs("__main__:PlainDepthwise", 1, PLAIN_DEPTHWISE)
    _, renamed = tiered_runs("depthwise_avg", 1)
    assert_all_columns_identical(plain, renamed, "depthwise_avg vs the old plain depthfl")


def test_depthfl_differs_from_depthwise_avg_only_where_a_client_holds_two_or_more_exits(tiered_runs):
    """Round 1 starts both from the same model with the same clients: a level-1 client (one exit)
    trains the same bits, a level-2 or level-3 client's loss has the distillation term."""
    _, depthfl = tiered_runs("depthfl", 1)
    _, plain = tiered_runs("depthwise_avg", 1)
    first = depthfl["clients"]["round"] == 1
    for column in ("client_id", "tier", "num_samples", "upload_bytes"):
        assert same_bits(depthfl["clients"][column], plain["clients"][column]), column
    tier = depthfl["clients"]["tier"][first]
    loss, plain_loss = depthfl["clients"]["train_loss"][first], plain["clients"]["train_loss"][first]
    assert (tier == 1).any() and (tier > 1).any()
    assert same_bits(loss[tier == 1], plain_loss[tier == 1])
    assert np.all(loss[tier > 1] != plain_loss[tier > 1])
    # the deeper clients trained differently, so the averaged model differs
    assert depthfl["rounds"]["test_loss"][0] != plain["rounds"]["test_loss"][0]


def test_a_depthfl_results_file_from_before_the_distillation_reads_as_depthwise_averaging(tmp_path):
    """Results written when ``depthfl`` was the plain method carry no ``depthfl`` section: they
    are read (grouped, labelled, drawn) as ``depthwise_avg``, not as DepthFL."""
    from fake_results import make_config, make_rounds, write_fake_run
    from fedmpi.figures.common import algorithm_label
    from fedmpi.results.reader import read_run

    rounds = make_rounds([0.5, 0.6], 100)
    old = write_fake_run(tmp_path / "old.h5", make_config("depthfl", rounds=2), rounds)
    new = write_fake_run(tmp_path / "new.h5", make_config("depthfl", rounds=2, depthfl={"kd": True}), rounds)
    assert read_run(old).algorithm == "depthwise_avg"
    assert algorithm_label(read_run(old).algorithm) == "depth-wise averaging"
    assert read_run(new).algorithm == "depthfl"

"""bnexp.layout: the run directory's contract, written once and documented in results/README.md."""
from pathlib import Path

import pytest

from bnexp import config as C
from bnexp import layout as L
from runfactory import fake_run

README = (Path(__file__).parent.parent / "results" / "README.md").read_text()
FILES = (L.CONFIG, L.INFO, L.METRICS, L.STEPS, L.EVALS, L.PRECISE, L.MEASURES, L.ACTIVATIONS, L.CHECKPOINT,
         L.ERROR_LOG, L.LOCK)


@pytest.mark.parametrize("name", FILES)
def test_every_file_of_a_run_has_a_row_in_results_readme(name):
    assert f"| `{name}` |" in README


@pytest.mark.parametrize("columns", [L.METRIC_COLUMNS, L.STEP_COLUMNS, L.EVAL_COLUMNS, L.PRECISE_COLUMNS,
                                     L.MEASURE_COLUMNS])
def test_the_columns_are_the_documented_ones(columns):
    assert f"`{','.join(columns)}`" in README


def test_the_statuses_are_the_documented_ones():
    written = [s for s in L.STATUSES if s != L.INTERRUPTED]
    assert " / ".join(f"`{s}`" for s in written) in README and f"`{L.INTERRUPTED}`" in README
    assert set(L.FINISHED) < set(L.STATUSES) and set(L.RESULT_STATUSES) - set(L.STATUSES) == {L.SKIPPED, L.BUSY}


@pytest.mark.parametrize("epoch,layer,where", [(0, "conv1.norm", "output"), (20, "fc2.norm", "input"),
                                                (3, "features.0/norm", "input")])
def test_an_activation_key_parses_back_to_what_built_it(epoch, layer, where):
    key = L.activation_key(epoch, layer, where)
    assert L.parse_activation_key(key) == (epoch, layer, where)


@pytest.mark.parametrize("key", ["e/conv1.norm/input", "x1/conv1.norm/input", "e1/input", "e1/conv1.norm/in put",
                                 "e1.5/a/input", ""])
def test_other_keys_are_not_activation_keys(key):
    assert L.parse_activation_key(key) is None


def test_a_fake_run_lives_under_the_run_id_of_its_config(tmp_path):
    run = fake_run(tmp_path, lr=0.5, bn="off", seed=3, config={"model.name": "alexnet_cifar", "data.name": "cifar100"})
    cfg = C.compose(["model=alexnet_cifar", "data=cifar100", "lr=0.5", "bn=off", "seed=3", "device=cpu",
                     "progress=false", f"results_dir={tmp_path}"])
    assert run == L.run_path(tmp_path, C.run_id(cfg)) and C.from_yaml(run / L.CONFIG) == cfg
    assert {p.name for p in run.iterdir()} <= set(FILES) and (run / L.ACTIVATIONS).is_file()

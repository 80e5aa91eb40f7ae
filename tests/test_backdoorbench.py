"""Importing BackdoorBench's attack_result.pt: a genuine-format record loads (numpy inside, PNGs
next to it); a malicious pickle is refused before its payload can run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3tune.backdoorbench import AttackResult, load_attack_result
from d3tune.errors import UsageError

H = W = 8
RECORD = "./record/badnet_demo"  # where BackdoorBench's attack scripts write, relative to their cwd


def make_record(folder: Path, *, model_name: str = "preactresnet18", absolute: bool = False,
                n: int = 5, size: int = H, state: dict | None = None,
                clean_data: str = "cifar10") -> tuple[Path, np.ndarray]:
    """A small attack_result.pt in BackdoorBench's layout: numpy arrays and scalars inside, the
    poisoned test PNGs under bd_test_dataset/<label>/<index>.png, paths as the attack script
    stored them (relative to where it ran, i.e. under record/<name>/)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    data_dict = {}
    for k in range(n):
        index, true = np.int64(10 + 3 * k), np.int64(1 + k % 9)
        png = folder / "bd_test_dataset" / "0" / f"{index}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k]).save(png)
        stored = str(png) if absolute else f"{RECORD}/bd_test_dataset/0/{index}.png"
        data_dict[index] = {"path": stored, "other_info": [np.int64(0), true]}
    record = {
        "model_name": model_name,
        "num_classes": 10,
        "model": state if state is not None else {
            "conv1.weight": torch.randn(64, 3, 3, 3), "linear.weight": torch.randn(10, 512),
            "linear.bias": torch.zeros(10)},
        "data_path": "./data/cifar10",
        "img_size": [size, size, 3],
        "clean_data": clean_data,
        "bd_train": {"original_index_array": np.arange(20),
                     "poison_indicator": (np.arange(20) % 10 == 0).astype(np.float64),
                     "bd_data_container": {"save_folder_path": f"{RECORD}/bd_train_dataset",
                                           "data_dict": {}, "save_file_format": ".png"}},
        "bd_test": {"original_index_array": np.array(sorted(int(i) for i in data_dict)),
                    "poison_indicator": np.ones(n),
                    "bd_data_container": {"save_folder_path": f"{RECORD}/bd_test_dataset",
                                          "data_dict": data_dict, "save_file_format": ".png"}},
    }
    path = folder / "attack_result.pt"
    torch.save(record, path)
    return path, images


def test_genuine_record_loads(tmp_path):
    path, images = make_record(tmp_path)
    # The file really needs numpy globals: a plain weights_only load refuses it.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    r = load_attack_result(path)
    assert isinstance(r, AttackResult)
    assert (r.model_name, r.arch, r.num_classes, r.dataset) == ("preactresnet18", "preactresnet18",
                                                               10, "cifar10")
    assert r.image_shape == (3, H, W) and r.mean == (0.4914, 0.4822, 0.4465)
    assert set(r.state_dict) == {"conv1.weight", "linear.weight", "linear.bias"}
    assert r.x_bd_test.dtype == torch.uint8 and r.x_bd_test.shape == (5, 3, H, W)
    assert torch.equal(r.x_bd_test, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert r.y_bd_target.tolist() == [0] * 5
    assert r.y_bd_true.tolist() == [1, 2, 3, 4, 5]
    assert r.bd_test_index.tolist() == [10, 13, 16, 19, 22]
    assert r.poison_train_index.tolist() == [0, 10]


def test_absolute_image_paths(tmp_path):
    path, images = make_record(tmp_path, absolute=True)
    assert torch.equal(load_attack_result(path).x_bd_test,
                       torch.from_numpy(images).permute(0, 3, 1, 2))


class Payload:
    """Pickles to a call that creates a file: proof of code execution if it ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "attack_result.pt"
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": {},
                "evil": Payload(marker)}, path)
    with pytest.raises(UsageError) as err:
        load_attack_result(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name, words", [("vit_b_16", "not supported"),
                                         ("resnet18", "supported BackdoorBench models")])
def test_unsupported_models(tmp_path, name, words):
    path, _ = make_record(tmp_path, model_name=name)
    with pytest.raises(UsageError, match=words):
        load_attack_result(path)


def test_unreadable_inputs_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_attack_result(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="junk.pt"):
        load_attack_result(junk)
    path, _ = make_record(tmp_path)
    next((tmp_path / "bd_test_dataset" / "0").glob("*.png")).unlink()
    with pytest.raises(UsageError, match="not found") as err:
        load_attack_result(path)
    assert "\n" not in str(err.value)
    path, _ = make_record(tmp_path)
    next((tmp_path / "bd_test_dataset" / "0").glob("*.png")).write_bytes(b"garbage")
    with pytest.raises(UsageError, match="unreadable PNG"):
        load_attack_result(path)


def _truncated_zip(path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(64)}}, path)
    path.write_bytes(path.read_bytes()[:300])


def _zip_of_text(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hello")


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)), "not a torch checkpoint"),
    (lambda p: p.write_bytes(b"\x80" + np.random.default_rng(2).bytes(4096)),
     "not a torch checkpoint"),
    (lambda p: p.write_bytes(b"hello world\n"), "not a torch checkpoint"),
    (lambda p: p.write_bytes(b""), "empty"),
    (_truncated_zip, "truncated"),
    (_zip_of_text, "not a torch checkpoint"),
    (lambda p: p.write_bytes(__import__("pickle").dumps({"model_name": "x"}, protocol=4)),
     "not a torch checkpoint"),
], ids=["random", "random-from-0x80", "text", "empty", "truncated-zip", "other-zip", "pickle"])
def test_files_that_are_not_checkpoints_say_so(tmp_path, make, words, recwarn):
    """Random bytes, text, an empty file, a cut-off download, some other zip, a bare pickle: one
    line naming the file and what it is not, with no empty reason and no library warning."""
    path = tmp_path / "attack_result.pt"
    make(path)
    with pytest.raises(UsageError) as err:
        load_attack_result(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and words in msg, msg
    assert "\n" not in msg and "()" not in msg and "needs code" not in msg, msg
    assert len(msg) < 300, msg
    assert not [w for w in recwarn if "torch" in str(w.filename)], [str(w.message) for w in recwarn]


# --- Running defenses on an imported model ---------------------------------------------------

BB_MEAN, BB_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)  # BackdoorBench's CIFAR-10


def bb_state_dict() -> dict[str, torch.Tensor]:
    """A PreActResNet-18 state dict as BackdoorBench saves it: our layer names, no normalisation
    buffers (BackdoorBench normalises in its transforms)."""
    from d3tune.models import ModelSpec, build_model

    torch.manual_seed(7)
    model = build_model("preactresnet18", ModelSpec(10, 3, 32, (0.0,) * 3, (1.0,) * 3))
    with torch.no_grad():  # non-trivial BN statistics, so a wrong normalisation would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("normalize.")}


def reference_metrics(state: dict, x_bd: np.ndarray, x_test: torch.Tensor,
                      y_test: torch.Tensor) -> tuple[float, float]:
    """ACC and ASR computed here, the way BackdoorBench evaluates: float pixels / 255,
    normalised with its CIFAR-10 mean/std, then the bare network."""
    from d3tune.models import ModelSpec, build_model

    net = build_model("preactresnet18", ModelSpec(10, 3, 32, (0.0,) * 3, (1.0,) * 3))
    net.load_state_dict({**state, "normalize.mean": torch.zeros(1, 3, 1, 1),
                         "normalize.std": torch.ones(1, 3, 1, 1)})
    net.eval()
    mean, std = torch.tensor(BB_MEAN).view(1, 3, 1, 1), torch.tensor(BB_STD).view(1, 3, 1, 1)
    norm = lambda x: (x.float() / 255 - mean) / std  # noqa: E731
    with torch.no_grad():
        bd = torch.from_numpy(x_bd).permute(0, 3, 1, 2)
        asr = (net(norm(bd)).argmax(1) == 0).float().mean().item()
        acc = (net(norm(x_test)).argmax(1) == y_test).float().mean().item()
    return acc, asr


@pytest.fixture
def record_and_cifar(tmp_path):
    from test_real_datasets import write_cifar

    state = bb_state_dict()
    path, images = make_record(tmp_path / "record", size=32, n=12, state=state)
    write_cifar(tmp_path / "cifar", n=20)
    return path, images, state, tmp_path / "cifar"


def test_run_defends_a_backdoorbench_model(record_and_cifar, tmp_path, capsys):
    """`d3tune run --attack-result`: dataset and architecture come from the record, the weights
    and poisoned test set from the file, ACC/ASR before the defense equal BackdoorBench-style
    evaluation of the same weights, and nothing is trained or cached."""
    import json

    from d3tune.cli import main
    from d3tune.data import load_dataset

    path, images, state, cifar = record_and_cifar
    cache = tmp_path / "cache"
    rc = main(["run", "--attack-result", str(path), "--data-dir", str(cifar), "--defense", "d3",
               "--epochs", "1", "--clean-ratio", "0.2", "--device", "cpu", "--no-mlflow",
               "--cache-dir", str(cache), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 0, err
    bars = [ln for ln in err.splitlines() if "━" in ln]  # nothing trains: the defense's bar only
    assert len(bars) == 1 and bars[0].startswith("defense d3") and "1/1" in bars[0], err
    result = json.loads(next((tmp_path / "runs").glob("*/result.json")).read_text())
    cfg = result["config"]
    assert (cfg["attack"]["name"], cfg["data"]["name"], cfg["model"]["arch"]) == (
        "backdoorbench", "cifar10", "preactresnet18")
    assert cfg["attack"]["result"] == str(path)
    assert "attack_train" not in result["seconds"] and not cache.exists()
    assert result["cache_key"].startswith("backdoorbench-")
    data = load_dataset("cifar10", cifar)
    acc, asr = reference_metrics(state, images, data.x_test, data.y_test)
    assert result["metrics"]["acc_before"] == pytest.approx(acc, abs=1e-6)
    assert result["metrics"]["asr_before"] == pytest.approx(asr, abs=1e-6)
    assert len(result["history"]) == 1 and "loss_dist" in result["history"][0]


def test_imported_model_normalises_like_backdoorbench(record_and_cifar):
    """The model is built with BackdoorBench's mean/std for the data (not d3tune's CIFAR-10
    profile, which differs in the 3rd decimal) and holds the record's weights exactly."""
    from d3tune.config import resolve, trial_config
    from d3tune.data import load_dataset
    from d3tune.trial import run_trial

    path, _, state, cifar = record_and_cifar
    cfg = resolve(trial_config({"data": {"name": "cifar10", "data_dir": str(cifar)},
                                "attack": {"name": "backdoorbench", "result": str(path)},
                                "defense": {"name": "ft", "epochs": 1, "lr": 1e-12},
                                "device": "cpu"}))
    data = load_dataset("cifar10", cifar)
    assert data.std != BB_STD
    res = run_trial(cfg, data=data)
    assert res.model.normalize.std.flatten().tolist() == pytest.approx(BB_STD)
    assert res.model.normalize.mean.flatten().tolist() == pytest.approx(BB_MEAN)
    assert torch.allclose(res.model.conv1.weight, state["conv1.weight"], atol=1e-8)
    assert not res.cache_hit and res.cache_key.startswith("backdoorbench-")


@pytest.mark.parametrize("extra, needle", [
    (["--dataset", "gtsrb", "--data-dir", "{cifar}"], "data.name: 'gtsrb', but"),
    (["--arch", "vgg19_bn", "--data-dir", "{cifar}"], "model.arch: 'vgg19_bn', but"),
    ([], "holds a model trained on cifar10, which d3tune reads from a folder; its recorded "
         "data_path './data/cifar10' is none of {record}/data/cifar10, "),
    (["--attack", "badnets", "--data-dir", "{cifar}"], "--attack-result: the record brings its "
                                                      "own attack"),
])
def test_mismatched_run_is_one_line_exit_2(record_and_cifar, extra, needle, capsys, tmp_path):
    from d3tune.cli import main

    path, _, _, cifar = record_and_cifar
    argv = ["run", "--attack-result", str(path), "--no-mlflow", "--out", str(tmp_path / "o"),
            *[a.format(cifar=cifar) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    needle = needle.format(record=path.parent)
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_weights_that_do_not_fit_are_refused_before_work(tmp_path, capsys):
    from test_real_datasets import write_cifar

    from d3tune.cli import main

    path, _ = make_record(tmp_path / "record", size=32)  # a partial state dict
    write_cifar(tmp_path / "cifar", n=3)
    rc = main(["run", "--attack-result", str(path), "--data-dir", str(tmp_path / "cifar"),
               "--no-mlflow", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "weights do not fit d3tune's 'preactresnet18' (missing" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_data_that_does_not_fit_the_record_is_refused_before_any_output(tmp_path, capsys):
    """A record of 8x8 images against CIFAR-10's 32x32: known only once the data is loaded, and
    still one line before any progress bar or results folder."""
    from test_real_datasets import write_cifar

    from d3tune.cli import main

    path, _ = make_record(tmp_path / "record", size=8, state=bb_state_dict())
    write_cifar(tmp_path / "cifar", n=3)
    rc = main(["run", "--attack-result", str(path), "--data-dir", str(tmp_path / "cifar"),
               "--no-mlflow", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("d3tune: error: data.data_dir: ") and "expects" in err
    assert not (tmp_path / "o").exists()


def test_attack_needs_its_result_path(capsys, tmp_path):
    from d3tune.cli import main

    assert main(["run", "--attack", "backdoorbench", "--no-mlflow"]) == 2
    assert "attack.result: attack 'backdoorbench' needs the path" in capsys.readouterr().err


def test_ablation_over_imported_models_with_relative_paths(record_and_cifar, tmp_path,
                                                          monkeypatch, local_ray):
    """A spec names records and data relative to where d3tune runs; Tune runs trials in their
    own folders, so the paths must survive that. One cell per record; a missing record is
    refused at load, naming it, before Ray runs anything."""
    import shutil
    import textwrap

    from d3tune.specs.inputs import check_inputs
    from d3tune.specs.sweep_spec import load_plan
    from d3tune.search.sweep_driver import run_plan

    path, _, _, _ = record_and_cifar
    shutil.copytree(path.parent, tmp_path / "record2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    body = """
        name: imported
        storage: tune
        cache_dir: cache
        experiment: imported
        base:
          data: {name: cifar10, data_dir: cifar, clean_ratio: 0.2}
          attack: {name: backdoorbench}
          defense: {name: d3, epochs: 2}
          device: cpu
        axes:
          attack.result: [record/attack_result.pt, %s]
        """
    spec = tmp_path / "imported.yaml"
    spec.write_text(textwrap.dedent(body % "missing/attack_result.pt"))
    with pytest.raises(UsageError, match="missing/attack_result.pt: no such file"):
        check_inputs(load_plan(spec, "ablation"))
    spec.write_text(textwrap.dedent(body % "record2/attack_result.pt"))
    plan = load_plan(spec, "ablation")
    check_inputs(plan)
    df = run_plan(plan)
    assert len(df) == 2 and set(df["attack.result"]) == {
        str(tmp_path / "record" / "attack_result.pt"), str(tmp_path / "record2" / "attack_result.pt")}
    assert df["asr_before"].nunique() == 1  # same weights and test set in both records
    assert not (tmp_path / "cache").exists()

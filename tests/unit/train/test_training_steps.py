"""The Trainer's components (issue 19b): ``TrainingSteps``' two extension points (``model_input``,
``after_generator_step``) and its swappable ``functions``, a subclass passed as ``steps_class``
(the reproduction harness's control row), and the checkpoint dict the ``Checkpointer`` composes."""

from __future__ import annotations

import copy

import pytest
import torch

from fastmlgan.config import build_config
from fastmlgan.data.stream import BatchStream
from fastmlgan.distributed import DistInfo
from fastmlgan.losses import bce_loss
from fastmlgan.reproduce.runner import LogisticControlSteps
from fastmlgan.train.steps import StepFunctions, TrainingSteps
from fastmlgan.train.trainer import Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))

# The checkpoint dict of format 1, in the order the Trainer has always written it (before the
# split into steps.py and state.py): a checkpoint of the new code pickles the same dict.
FORMAT_1_KEYS = [
    "format", "config", "class_names", "phase", "epoch", "global_step", "data_epoch", "epoch_step", "stream", "num_bad",
    "generator", "discriminator", "feature_extractor", "feature_extractor_source", "opt_g", "opt_d", "mismatch_sampler",
    "rng", "scaler", "baseline_metrics", "gan_metrics", "ema", "selection",  # issue 21: the weight average, the thresholds
]


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    from fastmlgan.data.sources import embedded

    root = tmp_path_factory.mktemp("steps") / "embedded"
    embedded.ensure(root, num_train=128, num_val=16, image_size=40, seed=0)
    return root


def _trainer(root, tmp_path, steps_class=TrainingSteps, **overrides) -> Trainer:
    cfg = build_config({"data.root": str(root), "data.embedded_num_val": "16", "out": str(tmp_path), **overrides}, preset="smoke")
    return Trainer(cfg, CPU, tmp_path, steps_class=steps_class)


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _first_batches(trainer: Trainer):
    bce = BatchStream(trainer.train_loader).next()
    trainer.start_gan_phase()
    gan = BatchStream(trainer.build_gan_loader(), data_epoch=1).next()
    return bce, gan


def test_after_generator_step_runs_once_per_g_update_after_the_optimizer_step(smoke_root, tmp_path):
    seen: list[torch.Tensor] = []

    class Recording(TrainingSteps):
        def after_generator_step(self) -> None:
            seen.append(_flat(self.generator))

    trainer = _trainer(smoke_root, tmp_path, Recording)
    steps = trainer.steps
    bce, gan = _first_batches(trainer)
    before = _flat(steps.generator)
    steps.bce_step(bce)
    assert len(seen) == 1
    assert not torch.equal(seen[0], before), "called before G's optimizer step"
    assert torch.equal(seen[0], _flat(steps.generator))
    d_before = _flat(steps.discriminator)
    steps.train_step(gan)  # gan.d_steps D updates and one G update
    assert steps.layout.d_steps > 1
    assert len(seen) == 2, "called for D updates too, or not for phase 2's G update"
    assert not torch.equal(_flat(steps.discriminator), d_before)
    assert torch.equal(seen[1], _flat(steps.generator))


def test_model_input_is_where_every_training_batch_becomes_the_input(smoke_root, tmp_path):
    """Overridden to hand the models zeros, every forward of both phases sees zeros: phase 1's
    loss is G's loss on zero images, phase 2's f_ext and G forwards get zero images."""
    calls: list[int] = []

    class Zeros(TrainingSteps):
        def model_input(self, batch):
            calls.append(batch["image"].shape[0])
            return torch.zeros_like(super().model_input(batch))

    trainer = _trainer(smoke_root, tmp_path, Zeros)
    steps = trainer.steps
    bce, gan = _first_batches(trainer)
    g = copy.deepcopy(steps.generator)
    expected = bce_loss(g, {"x": torch.zeros_like(bce["image"], dtype=torch.float32), "y": bce["labels"]})["loss_g"]  # uint8 from the cache
    out = steps.bce_step(bce)
    torch.testing.assert_close(out["loss_g"], expected)
    assert calls == [bce["image"].shape[0]]

    inputs: dict[str, torch.Tensor] = {}
    features, logits = steps.iteration_features, steps.generated_logits
    steps.iteration_features = lambda batch, images: (inputs.setdefault("f_ext", images), features(batch, images))[1]
    steps.generated_logits = lambda images: (inputs.setdefault("G", images), logits(images))[1]
    steps.train_step(gan)
    assert calls == [bce["image"].shape[0], gan["image"].shape[0]]
    assert inputs["f_ext"].shape[0] == gan["image"].shape[0] and not inputs["f_ext"].any()
    assert not inputs["G"].any()


def test_the_steps_call_their_functions_field(smoke_root, tmp_path):
    """``functions`` is what the steps run (bench/train.py swaps it to count FLOPs): each of its
    functions is called as often as the step needs it, none bypassed."""
    trainer = _trainer(smoke_root, tmp_path)
    steps = trainer.steps
    assert not trainer.cfg.compile.enable and steps.functions == StepFunctions.eager()
    calls: dict[str, int] = {}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return call

    eager = StepFunctions.eager()
    steps.functions = StepFunctions(**{name: counted(name, fn) for name, fn in vars(eager).items()})
    bce, gan = _first_batches(trainer)
    steps.bce_step(bce)
    assert calls == {"bce_loss": 1}
    calls.clear()
    steps.train_step(gan)
    d_steps = steps.layout.d_steps
    assert calls == {"features": 1, "logits": 1, "discriminator_loss": d_steps, "generator_loss": 1}


def test_control_steps_train_g_on_its_rows_alone_and_never_d(smoke_root, tmp_path):
    """The harness's control row (``LogisticControlSteps`` as ``steps_class``): a phase-2 step is
    a BCE step on the G-update rows of the iteration's batch; D never changes."""
    control = _trainer(smoke_root, tmp_path / "control", LogisticControlSteps)
    reference = _trainer(smoke_root, tmp_path / "reference")
    _, gan = _first_batches(control)
    _first_batches(reference)
    reference.steps.generator.load_state_dict(control.steps.generator.state_dict())
    reference.steps.opt_g.load_state_dict(copy.deepcopy(control.steps.opt_g.state_dict()))
    d_before = _flat(control.steps.discriminator)
    rows = control.layout.generator_rows()
    out = control.steps.train_step(gan)
    expected = reference.steps.bce_step({k: v[rows] for k, v in gan.items()})
    torch.testing.assert_close(out["loss_g"], expected["loss_g"])
    assert torch.equal(_flat(control.steps.generator), _flat(reference.steps.generator))
    assert torch.equal(_flat(control.steps.discriminator), d_before)


def test_checkpoint_dict_is_format_1_in_its_order(smoke_root, tmp_path):
    trainer = _trainer(smoke_root, tmp_path)
    trainer.steps.bce_step(BatchStream(trainer.train_loader).next())  # G and its optimizer leave their start
    state = trainer.state_dict()
    assert list(state) == FORMAT_1_KEYS
    assert state["format"] == 1 and state["phase"] == "bce" and state["global_step"] == 0
    # A resume into a fresh Trainer gives back the same dict (rank 0's random state included).
    other = _trainer(smoke_root, tmp_path / "other")
    assert not torch.equal(_flat(other.steps.generator), _flat(trainer.steps.generator))
    other.load_state_dict(copy.deepcopy(state))
    again = other.state_dict()
    for key in ("generator", "discriminator", "opt_g", "opt_d"):
        pairs = list(zip(_items(state[key]), _items(again[key])))
        assert pairs and len(pairs) == len(list(_items(state[key])))
        for (name, a), (other_name, b) in pairs:
            assert name == other_name
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f"{key}/{name}"
    assert torch.equal(state["rng"]["torch"], again["rng"]["torch"])


def _items(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _items(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v

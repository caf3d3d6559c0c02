"""G or D from a checkpoint, for sampling and evaluation: on the CPU, in eval mode, without DeepSpeed
or a process group."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from trainer.checkpoint import load_module_weights, read_meta, resolve_checkpoint
from trainer.checkpoint_io import CheckpointError
from trainer.config import CHECKPOINTS, Config, ConfigError, ModelConfig, config_from_dict
from trainer.models import Discriminator, Generator, init_weights, sample_z

Net = TypeVar("Net", Generator, Discriminator)


def load_checkpoint_config(checkpoint: str | Path) -> tuple[Path, Config]:
    """The resolved checkpoint folder (a run folder gives its newest) and the run's config."""
    folder = resolve_checkpoint(_existing(checkpoint))
    meta: dict[str, Any] = read_meta(folder)
    if "config" not in meta:
        raise CheckpointError(f"{folder}: trainer.json holds no config")
    return folder, _stored_config(folder, meta["config"])


def _stored_config(folder: Path, config: dict[str, Any]) -> Config:
    try:
        return config_from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'trainer.json'}: its config is invalid: {e}") from None


def _load_net(checkpoint: str | Path, tag: str, net_class: type[Net]) -> tuple[Config, Net]:
    folder = resolve_checkpoint(_existing(checkpoint))
    config, weights = load_module_weights(folder, tag)
    cfg = _stored_config(folder, config)
    net = net_class(cfg.model)
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:  # weights of another shape than the config gives: a tampered trainer.json, say
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3] if line.strip())
        raise CheckpointError(f"{folder / tag}: the weights do not fit the config in {folder / 'trainer.json'} "
                              f"({detail})") from None
    return cfg, net.eval()


def load_generator(checkpoint: str | Path) -> tuple[Config, Generator]:
    """G with the checkpoint's weights, in eval mode, on CPU (no DeepSpeed, no process group)."""
    return _load_net(checkpoint, "generator", Generator)


def load_discriminator(checkpoint: str | Path) -> tuple[Config, Discriminator]:
    """D with the checkpoint's weights, in eval mode (BatchNorm uses the saved running statistics)."""
    return _load_net(checkpoint, "discriminator", Discriminator)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (give a run folder or a step-XXXXXXXX folder)")
    return path


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder of a resolved checkpoint folder: RUN/checkpoints/step-N -> RUN."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


class CheckpointNets:
    """The trainer's checkpoints as evaluation's commands read them (evaluation.commands.CheckpointNets)."""

    config = staticmethod(load_checkpoint_config)
    generator = staticmethod(load_generator)
    discriminator = staticmethod(load_discriminator)
    sample_z = staticmethod(sample_z)
    run_folder = staticmethod(run_folder_of)

    @staticmethod
    def fresh_discriminator(model: ModelConfig) -> Discriminator:
        net = Discriminator(model)
        init_weights(net, model.init_std)
        return net

"""``fewshot <command> [overrides]``: a thin dispatcher onto Hydra apps for train and eval."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fewshot_cli.errors import FewshotError, Interrupted

GROUPS = ("algo", "backbone", "dataset", "augment", "device", "experiment")


def conf_dir() -> Path:
    """The config tree: inside the installed wheel, else the repository's top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _train(cfg: DictConfig) -> None:
    from fewshot_cli.train import train

    hydra_cfg = HydraConfig.get()
    train(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))


def _eval(cfg: DictConfig) -> None:
    from fewshot_cli.evaluate import evaluate

    evaluate(cfg)


COMMANDS: dict[str, tuple[Callable[[DictConfig], None], str]] = {
    "train": (_train, "meta-train an algorithm; writes TensorBoard events, last.pt and best.pt"),
    "eval": (_eval, "test a checkpoint on fixed episodes: accuracy ± 95% CI, results.json"),
}


def usage() -> str:
    """The top-level help: commands, config groups and their options."""
    lines = ["usage: fewshot <command> [key=value ...] [-m for a sweep] [--help]", "",
             "commands:"]
    lines += [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "config groups (choose with group=option):"]
    for group in GROUPS:
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        lines.append(f"  {group + '=':<12}{', '.join(options) or '(none yet)'}")
    lines += ["", "examples:",
              "  fewshot train dataset=glyphs train.steps=200",
              "  fewshot train algo=protonet dataset=omniglot dataset.split=minimal",
              "  fewshot train -m train.shots=1,5 seed=0,1,2",
              "  fewshot eval ckpt=outputs/<date>/<time>-protonet-omniglot/best.pt",
              "", "`fewshot train --help` shows every key and its current value."]
    return "\n".join(lines)


def _fail(message: str, code: int) -> None:
    print(f"fewshot: error: {message}", file=sys.stderr)
    sys.exit(code)


def _guarded(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Turn our errors into one sentence and a non-zero exit instead of a traceback."""

    def run(cfg: DictConfig) -> None:
        from fewshot_cli.engine.runtime import pad_host_heap

        pad_host_heap()
        try:
            task(cfg)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as err:  # Hydra's instantiate wraps our errors: find ours in the chain
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, FewshotError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            _fail(str(cause), 130 if isinstance(cause, Interrupted) else 1)

    return run


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fewshot`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)} "
              "(see fewshot --help)", 2)
    task, _ = COMMANDS[command]
    sys.argv = [f"fewshot {command}", *rest]
    app = hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")
    app(_guarded(task))()


if __name__ == "__main__":
    main()

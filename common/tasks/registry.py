"""Every task by name, and the config's `task:` section that picks and configures one.

A new task is a module with a `Task` subclass (`base.py`) plus one `TaskEntry` below: how to
build it from the config, its reward (a name in `reward/registry.py`), whether it takes
in-context examples, and its row in `lorafleet tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..configio import ConfigError
from .addition import AdditionTask
from .base import Task
from .dataset import DatasetTask, PromptDataConfig
from .nlu import SPECS, NLUOptions, NLUSpec, glue_task
from .vader import SentimentVaderTask, WritePositiveTask


@dataclass
class TaskConfig:
    """The run's task: `name` picks it (a key of `TASKS`, `lorafleet tasks`) and the other keys
    configure it. `build_task(cfg)` gives the task itself."""

    name: str = "addition"
    reward_fn: str | None = None  # None: the task's own (exact_match, label_match, ...)
    seed: int = 1234
    # addition, and dataset on the embedded model: the warm-start teacher slips with
    # probability demo_error_rate; one_high: the answer + 1 (a systematic habit SFT copies and
    # RL removes), near_miss: off by 1 or 10
    max_operand: int = 49
    eval_fraction: float = 0.1
    demo_error_rate: float = 0.7
    demo_slip: Literal["one_high", "near_miss"] = "one_high"
    # NLU tasks
    tasks: list[str] = field(default_factory=list)  # name=multi: the tasks mixed in training
    mixing: Literal["proportional", "temperature"] = "proportional"
    mixing_temperature: float = 2.0  # temperature mixing: task share ~ size^(1/T)
    data_dir: str | None = None  # official GLUE/SuperGLUE layout (SST-2/train.tsv...); None: hub
    shots: int = 0  # in-context examples before every prompt
    invalid_reward: float = 0.0  # reward of an answer that is no label word (e.g. -0.5)
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    skip_bad_rows: bool = False
    data: PromptDataConfig = field(default_factory=PromptDataConfig)  # name=dataset only

    def __post_init__(self) -> None:
        if self.reward_fn is None and self.name in TASKS:  # an unknown name fails validate()
            self.reward_fn = TASKS[self.name].reward_fn

    def validate(self) -> None:
        entry = task_entry(self.name)
        if (self.name == "dataset") != (self.data != PromptDataConfig()):
            raise ConfigError("task.data: name=dataset reads its prompts from task.data.train "
                              f"(a file or hub name), and only it does; got name={self.name!r}")
        if self.shots and not entry.shots:
            raise ConfigError(f"task.shots={self.shots}: task {self.name!r} takes no in-context "
                              "examples (`lorafleet tasks` lists the tasks)")
        mixable = [name for name, e in TASKS.items() if e.mixable]
        unknown = [t for t in self.tasks if t not in mixable]
        if unknown or entry.mixes != bool(self.tasks):
            raise ConfigError(f"task.tasks: name=multi needs NLU tasks from {mixable} "
                              f"(and only multi takes them); got {self.tasks}")


@dataclass(frozen=True)
class TaskEntry:
    build: Callable[[TaskConfig], Task]
    reward_fn: str  # the reward unless task.reward_fn / reward.fns name another
    # the `lorafleet tasks` row: data source, local file layout, answers, held-out metrics
    row: tuple[str, str, str, str]
    shots: bool = False  # takes in-context examples (task.shots, `lorafleet eval --shots`)
    mixable: bool = False  # a task that `mixes` may train on
    mixes: bool = False  # trains on the mixable tasks named in task.tasks


def nlu_options(cfg: TaskConfig) -> NLUOptions:
    return NLUOptions(cfg.shots, cfg.invalid_reward, cfg.mixing, cfg.mixing_temperature,
                      cfg.max_train_rows, cfg.max_eval_rows, cfg.seed)


def glue_entry(spec: NLUSpec) -> TaskEntry:
    layout = (f"{spec.local_dir}/train, {spec.local_dir}/{spec.local_eval} "
              "(.tsv/.jsonl/.parquet)")
    return TaskEntry(
        lambda cfg: glue_task(cfg.name, [cfg.name], nlu_options(cfg), cfg.data_dir,
                              cfg.skip_bad_rows),
        "label_match", (spec.hub_name("eval"), layout, ", ".join(spec.labels),
                        ", ".join(spec.metrics)), shots=True, mixable=True,
    )


TASKS: dict[str, TaskEntry] = {
    "addition": TaskEntry(
        lambda cfg: AdditionTask(cfg.max_operand, cfg.eval_fraction, cfg.demo_error_rate,
                                 cfg.demo_slip, cfg.seed),
        "exact_match", ("generated: `a+b=` with operands in [0, task.max_operand]", "—",
                        "the sum", "accuracy (exact_match)"),
    ),
    **{name: glue_entry(spec) for name, spec in SPECS.items()},
    "sentiment_vader": TaskEntry(
        lambda cfg: SentimentVaderTask(nlu_options(cfg)), "label_match",
        ("offline: VADER-labelled sentences (`make-data sentiment`)", "SST-2",
         "negative, positive", "accuracy"), shots=True,
    ),
    "write_positive": TaskEntry(
        lambda cfg: WritePositiveTask(), "vader_compound",
        ("offline: openings of the VADER sentences", "—",
         "(free text; reward = VADER compound)", "vader_compound"),
    ),
    "dataset": TaskEntry(
        lambda cfg: DatasetTask(cfg.data, cfg.seed, cfg.demo_error_rate, cfg.demo_slip),
        "exact_match",
        ("`task.data.train`: a prompt file or hub dataset", "prompt column (text or messages)",
         "scored by reward.fns (TRL's contract)", "the rewards"),
    ),
    "multi": TaskEntry(
        lambda cfg: glue_task("multi", cfg.tasks, nlu_options(cfg), cfg.data_dir,
                              cfg.skip_bad_rows),
        "label_match", ("`task.tasks: [...]`, mixed by `task.mixing`", "", "",
                        "each task's own"), shots=True, mixes=True,
    ),
}


def task_entry(name: str) -> TaskEntry:
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; allowed: {list(TASKS)}")
    return TASKS[name]


def build_task(cfg: TaskConfig) -> Task:
    """The task `cfg` configures (an NLU task reads its data on first use): build it once per
    run and pass it on (the driver's RunInputs holds it)."""
    return task_entry(cfg.name).build(cfg)

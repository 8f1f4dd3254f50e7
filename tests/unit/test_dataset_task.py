"""A user's own prompt dataset (`task.name=dataset`) and reward functions in TRL's contract:
rows as text or chat messages, every other column carried to the rewards, TRL-style reward
functions run unchanged, and bad input named before any actor starts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from helpers import train_config_error
from lorafleet.cluster.config import load_train_config
from lorafleet.common.configio import ConfigError
from lorafleet.common.corpora import DatasetError
from lorafleet.common.data import encode_prompts
from lorafleet.common.records import Rollout
from lorafleet.common.tasks.registry import build_task
from lorafleet.reward.pool import RewardError, RewardSpec, RewardTimeout, RewardWorker
from lorafleet.reward.registry import check_reward_fn, get_reward_fn

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
TRL = "trl_style_rewards"
USER_JSONL = Path(__file__).parents[1] / "data" / "chat_prompts.jsonl"  # a user's own file


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int = 10) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{i}+{i}="}], "solution": str(2 * i),
             "data_source": "gsm" if i % 2 else "other"} for i in range(n)]


def dataset_cfg(path: str, *overrides: str):
    return load_train_config(None, ["task.name=dataset", f"task.data.train.path={path}",
                                    *overrides])


@pytest.fixture
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_conversations_render_with_the_chat_template_and_keep_their_columns(
    tmp_path, chat_tokenizer
):
    cfg = dataset_cfg(write_rows(tmp_path / "rows.jsonl", chat_rows()),
                      "task.data.eval_fraction=0.2", "task.data.system_prompt=Be brief.")
    task = build_task(cfg.task)
    train, held_out = task.examples("train"), task.examples("eval")
    assert (len(train), len(held_out)) == (8, 2)  # a seeded 20% held out, never trained on
    assert not {ex.columns["solution"] for ex in train} & {ex.columns["solution"] for ex in
                                                          held_out}
    ex = train[0]
    assert ex.conversation[0] == {"role": "system", "content": "Be brief."}
    assert set(ex.columns) == {"solution", "data_source"}
    prompts = encode_prompts(train, chat_tokenizer, 100)
    p = prompts[0]
    assert p.text == f"system: Be brief.\nuser: {ex.conversation[1]['content']}\nassistant:"
    # the ids vLLM generates from and the learner trains on: the rendered text, tokenised
    # without a second set of special tokens
    assert p.token_ids == chat_tokenizer(p.text, add_special_tokens=False).input_ids
    assert p.columns == ex.columns and p.conversation == ex.conversation


def test_separate_eval_file_and_plain_text_prompts_from_csv(tmp_path, tokenizer):
    train = tmp_path / "train.csv"
    train.write_text("prompt,answer\n1+1=,2\n2+2=,4\n3+3=,6\n")
    held = tmp_path / "eval.csv"
    held.write_text("prompt,answer\n4+4=,8\n")
    task = build_task(dataset_cfg(str(train), f"task.data.eval.path={held}").task)
    assert [ex.prompt for ex in task.examples("eval")] == ["4+4="]
    prompts = encode_prompts(task.examples("train"), tokenizer, 100)
    assert prompts[1].token_ids == tokenizer("2+2=").input_ids  # plain text: as the tasks do
    assert prompts[1].columns == {"answer": "4"} and prompts[1].conversation is None
    # a prompt too long for the model names its file and row (row 1 of train.csv, whatever its
    # place among the training prompts)
    train.write_text("prompt,answer\n1+1=,2\n" + "9" * 50 + "+1=,1\n3+3=,6\n")
    task = build_task(dataset_cfg(str(train), f"task.data.eval.path={held}").task)
    with pytest.raises(ValueError, match=r"train.csv: row 1 \('9999.*has \d+ tokens"):
        encode_prompts(task.examples("train"), tokenizer, 20)


def rollouts_for(prompts, texts):
    return [Rollout(p, 0, [1], t, [0.0], "stop", 0, 0) for p, t in zip(prompts, texts,
                                                                       strict=True)]


def test_trl_reward_functions_run_unchanged(tmp_path, chat_tokenizer):
    cfg = dataset_cfg(write_rows(tmp_path / "rows.jsonl", chat_rows(4)),
                      "task.data.eval_fraction=0.25")
    prompts = encode_prompts(build_task(cfg.task).examples("train"), chat_tokenizer, 100)
    names = (f"{TRL}:accuracy_reward", f"{TRL}:format_reward_func", f"{TRL}:only_for_gsm")
    for name in names:
        check_reward_fn(get_reward_fn(name), name, "reward.fns", set(prompts[0].columns))
    texts = [f"The answer is {p.columns['solution']}." for p in prompts[:2]] + ["no idea"]
    spec = RewardSpec(names, weights=(1.0, 0.5, 2.0))
    scored = RewardWorker(spec).score(rollouts_for(prompts, texts))
    for s, text in zip(scored, texts, strict=True):
        gsm = s.rollout.prompt.columns["data_source"] == "gsm"
        right = text != "no idea"
        assert s.rule_parts == {names[0]: float(right), names[1]: float(right),
                                names[2]: 1.0 if gsm else None}
        assert s.reward == 1.5 * right + (2.0 if gsm else 0.0)  # None: left out of the sum
    # plain-text completions for plain-text prompts (the addition task's)
    plain = encode_prompts(build_task(load_train_config(None, []).task).examples("eval")[:1],
                           chat_tokenizer, 100)
    length = RewardWorker(RewardSpec((f"{TRL}:reward_len",))).score(
        rollouts_for(plain, ["x" * 25]))
    assert length[0].reward == -5.0


@pytest.mark.parametrize("row, message", [
    ({"prompt": 42}, "rows.jsonl: row 0: column 'prompt' is neither text nor a list of "
     "messages: int"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, "rows.jsonl: row 0: column 'prompt': "
     "message 0 has unknown role 'robot' (allowed: system, user, assistant, tool)"),
    ({"prompt": [{"role": "user"}]}, "row 0: column 'prompt': message 0 is not a {role, "
     "content} object"),
    ({"question": "1+1="}, "rows.jsonl: row 0: missing column 'prompt' (has ['question'])"),
])
def test_bad_rows_name_file_row_and_column(tmp_path, row, message):
    cfg = dataset_cfg(write_rows(tmp_path / "rows.jsonl", [row, *chat_rows(3)]))
    with pytest.raises(DatasetError) as err:
        build_task(cfg.task)
    assert message in str(err.value)


@pytest.mark.parametrize("fn, columns, message", [
    (f"{TRL}:accuracy_reward", {"answer"}, "needs column(s) ['solution'], which the prompt "
     "data lacks (its columns: ['answer'])"),
    ("helpers:fn_without_completions", set(), "has no `completions` argument"),
    ("helpers:fn_without_kwargs", {"solution", "id"}, "does not accept "
     "['completion_ids', 'id', 'prompts'], which every call passes; add **kwargs"),
])
def test_reward_function_signature_checked_up_front(fn, columns, message):
    with pytest.raises(ConfigError) as err:
        check_reward_fn(get_reward_fn(fn), fn, "reward.fns", columns)
    assert message in str(err.value)


def test_bad_reward_values_name_the_function_and_sample(tokenizer):
    prompts = encode_prompts(build_task(load_train_config(None, []).task).examples("eval")[:2],
                             tokenizer, 100)
    rollouts = rollouts_for(prompts, ["1", "2"])
    with pytest.raises(RewardError, match="returned 1 values for a batch of 2"):
        RewardWorker(RewardSpec(("helpers:fn_wrong_length",))).score(rollouts)
    with pytest.raises(RewardError, match=r"'helpers:fn_strings' returned '1.0' \(a str\) for "
                       "prompt 0 sample 0"):
        RewardWorker(RewardSpec(("helpers:fn_strings",))).score(rollouts)
    with pytest.raises(RewardError, match="'helpers:fn_scalar' returned float values for a "
                       "batch of 2"):
        RewardWorker(RewardSpec(("helpers:fn_scalar",))).score(rollouts)
    with pytest.raises(RewardError, match="'helpers:fn_inf' returned inf for prompt 0 sample 0"):
        RewardWorker(RewardSpec(("helpers:fn_inf",))).score(rollouts)
    with pytest.raises(RewardError, match=r"'helpers:fn_raises_timeout' raised on prompt 0 "
                       "sample 0") as raised:  # its own TimeoutError: not reward.timeout_s
        RewardWorker(RewardSpec(("helpers:fn_raises_timeout",))).score(rollouts)
    assert not isinstance(raised.value, RewardTimeout)
    with pytest.raises(RewardError, match="no reward function applies to prompt 0 sample 0"):
        RewardWorker(RewardSpec(("helpers:fn_none",))).score(rollouts)
    skipped = RewardWorker(RewardSpec(("helpers:fn_none",), skip_errors=True))
    assert all(s.error for s in skipped.score(rollouts))


def test_the_cli_prints_a_stopped_run_in_one_line():
    """A reward error raised in a reward actor reaches the driver wrapped by Ray, its remote
    traceback in the text: the CLI prints the error alone; a bug keeps its traceback."""
    import ray

    from lorafleet.cluster.cli import one_line_error
    from lorafleet.cluster.trainer import LearnerDied

    error = RewardError("reward 'rewards:slow' did not return for prompt 3 sample 1")
    try:
        raise error
    except RewardError as exc:
        wrapped = ray.exceptions.RayTaskError(
            "score", "Traceback (most recent call last):\n  File ...", exc).as_instanceof_cause()
    assert isinstance(wrapped, RewardError) and str(wrapped) != str(error)
    assert one_line_error(wrapped) == (f"lorafleet: reward error: {error}", 1)
    too_long = DatasetError("rows.jsonl: row 60 ('...') has 3208 tokens; the limit is 122")
    assert one_line_error(too_long) == (f"lorafleet: dataset error: {too_long}", 2)
    died = LearnerDied("the learner actor died; continue with: lorafleet train --resume R")
    assert one_line_error(died) == (f"lorafleet: run stopped: {died}", 1)
    assert one_line_error(KeyError("a bug")) is None


@pytest.mark.parametrize("skip_errors", [False, True])
def test_a_reward_that_never_returns_ends_in_an_error_naming_it(tokenizer, skip_errors):
    """Not a per-sample failure: reward.on_error=skip stops the run too. The stuck call stays
    behind in a daemon thread of the reward actor (here: of pytest)."""
    prompts = encode_prompts(build_task(load_train_config(None, []).task).examples("eval")[:5],
                             tokenizer, 100)
    worker = RewardWorker(RewardSpec(("exact_match", "helpers:fn_never_returns"), timeout_s=0.5,
                                     skip_errors=skip_errors))
    with pytest.raises(RewardTimeout) as failure:
        worker.score(rollouts_for(prompts, ["1", "2", "3", "4", "5"]))
    assert str(failure.value) == (
        "reward 'helpers:fn_never_returns' did not return within reward.timeout_s=0.5 on a "
        "batch of 5 (sample ids prompt 0 sample 0, prompt 1 sample 0, prompt 2 sample 0, ...): "
        "fix the function, or raise reward.timeout_s if it is only slow")


def test_one_reward_worker_scores_each_batch_by_its_own_spec(tokenizer):
    """One pool of reward actors serves every policy: a batch scored with a spec gets that
    spec's rewards (its functions built on first use, then kept), without one the actor's."""
    prompts = encode_prompts(build_task(load_train_config(None, []).task).examples("eval")[:2],
                             tokenizer, 100)
    sums = [int(p.reference) for p in prompts]
    rollouts = rollouts_for(prompts, [str(sums[0]), str(sums[1] + 1)])
    worker = RewardWorker(RewardSpec(("exact_match",)))
    plus_one = RewardSpec(("helpers:exact_sum_plus_one",), weights=(2.0,))
    assert [s.reward for s in worker.score(rollouts)] == [1.0, 0.0]
    assert [s.reward for s in worker.score(rollouts, plus_one)] == [0.0, 2.0]
    assert [s.reward for s in worker.score(rollouts, RewardSpec(("exact_match",)))] == [1, 0]
    assert [s.reward for s in worker.score(rollouts, RewardSpec(
        ("helpers:exact_sum_plus_one",), weights=(2.0,)))] == [0.0, 2.0]
    assert list(worker.fns) == [worker.spec, plus_one]  # an equal spec is the same spec


def test_conversation_without_chat_template_and_misplaced_keys(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rows.jsonl", chat_rows(4))
    task = build_task(dataset_cfg(path, "task.data.eval_fraction=0.25").task)
    assert not tokenizer.chat_template
    with pytest.raises(ConfigError, match="has no chat template: set model.chat_template"):
        encode_prompts(task.examples("train"), tokenizer, 100)
    with pytest.raises(ConfigError, match="task.data: name=dataset reads its prompts"):
        load_train_config(None, [f"task.data.train.path={path}"])  # task.name is addition
    with pytest.raises(ConfigError, match=r"task.data.train: \['response_column'\] are keys"):
        dataset_cfg(path, "task.data.train.response_column=answer")
    with pytest.raises(ConfigError, match="reward.weights: 2 weights for 1 reward.fns"):
        load_train_config(None, ["reward.fns=[exact_match]", "reward.weights=[1, 2]"])


def test_math_verify_reads_boxed_hashes_fractions_and_conversations():
    fn = get_reward_fn("math_verify")
    completions = ["so \\boxed{\\frac{1}{2}}", "#### 42", "It is 41.", "$0.5$"]
    assert fn(completions=completions, answer=["0.5", "42", "42", "\\frac{1}{2}"]) == [
        1.0, 1.0, 0.0, 1.0]
    # GSM8K's worked answer as the gold, a conversational completion
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May. 48+24 = 72 #### 72"
    chat = [[{"role": "assistant", "content": "She sold 72 clips in total: \\boxed{72}"}]]
    assert fn(completions=chat, answer=[gold]) == [1.0]


def test_format_and_length_rewards():
    boxed = get_reward_fn("boxed_format")
    assert boxed(completions=["so \\boxed{7}", "so 7", "\\boxed{}"]) == [1.0, 0.0, 0.0]
    assert get_reward_fn("length_penalty")(completion_ids=[[1, 2, 3], []]) == [-3.0, 0.0]
    think = get_reward_fn("format_regex", settings={"reward.format_regex": r"^<think>.*</think>"})
    assert think(completions=["<think>a\nb</think> 7", "7 <think></think>", "<think>7"]) == [
        1.0, 0.0, 0.0]  # across lines; anchored at the start; unclosed


@pytest.mark.parametrize("overrides, message", [
    (["reward.format_regex=^x"], "reward.format_regex is the pattern of the format_regex reward"),
    (["reward.fns=[format_regex]", "reward.format_regex=(x"],
     "reward.format_regex='(x': not a regular expression (missing ), unterminated subpattern"),
])
def test_format_regex_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    ([f"reward.fns=[{TRL}:accuracy_reward]", f"model.chat_template={CHAT_TEMPLATE}"],
     f"reward.fns='{TRL}:accuracy_reward': needs column(s) ['solution'], which the prompt data "
     "lacks (its columns: ['answer', 'data_source'])"),
    (["reward.fns=[math_verify]"], "prompt 'What is 3+4?' is a conversation, but the tokenizer "
     "of"),
])
def test_train_names_a_bad_user_dataset_before_ray(
    overrides, message, tiny_model_path, tmp_path, capsys, monkeypatch
):
    err = train_config_error(["task.name=dataset", f"task.data.train.path={USER_JSONL}",
                              f"model.name_or_path={tiny_model_path}", *overrides],
                             tmp_path, capsys, monkeypatch)
    assert err.startswith(f"lorafleet: config error: {message}"), err


WORD_PROBLEMS = Path(__file__).parents[2] / "deploy" / "data" / "word_problems.jsonl"


def test_make_data_word_problems_writes_the_shipped_file(tmp_path):
    from lorafleet.cluster.cli import main

    out = tmp_path / "word_problems.jsonl"
    main(["make-data", "word-problems", str(out)])
    assert out.read_bytes() == WORD_PROBLEMS.read_bytes()  # the shipped config's data
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"prompt": [{"role": "user", "content": "A box holds 10 stamps. Ben adds "
                                   "4, takes out 4 and takes out 5. How many stamps are in the "
                                   "box now?"}], "answer": "5"}  # 10 + 4 - 4 - 5, by hand
    assert len({r["prompt"][0]["content"] for r in rows}) == len(rows) == 3000
    assert min(int(r["answer"]) for r in rows) >= 0
    main(["make-data", "word-problems", str(out), "--rows", "5", "--seed", "3"])
    assert len(out.read_text().splitlines()) == 5
    with pytest.raises(SystemExit):  # a config error: --rows is for word-problems only
        main(["make-data", "sft", str(out), "--rows", "5"])


def test_dataset_model_recipe_chatml_tokenizer_and_biased_teacher(tmp_path):
    """The embedded model of a dataset: ChatML with its tokens special (the end of a turn is
    the EOS), warm-start answers from the `answer` column, one too high 70% of the time."""
    import random

    from lorafleet.common.data import render_prompt
    from lorafleet.common.tiny_model import build_tokenizer

    rows = [{"prompt": [{"role": "user", "content": f"Tom has {i} pens. How many?"}],
             "answer": str(i)} for i in range(20)]
    recipe = build_task(dataset_cfg(write_rows(tmp_path / "wp.jsonl", rows)).task).model_recipe
    tokenizer = build_tokenizer(list(recipe.tokenizer_corpus()), recipe)
    examples = recipe.warm_start_examples()
    text, ids = render_prompt(examples[0], tokenizer)
    assert text == (f"<|im_start|>user\n{examples[0].prompt}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert all(ex.answer == ex.columns["answer"] for ex in examples)
    rng = random.Random(0)
    slips = [recipe.demonstration(examples[0], rng) for _ in range(1000)]
    assert set(slips) == {examples[0].answer, str(int(examples[0].answer) + 1)}
    assert 0.65 < slips.count(str(int(examples[0].answer) + 1)) / 1000 < 0.75
    assert recipe.recipe()["name"] == "wp"
    for row in rows:  # other rows, another model; a non-integer answer is named
        row["answer"] = "seven"
    other = build_task(dataset_cfg(write_rows(tmp_path / "wp2.jsonl", rows)).task).model_recipe
    assert other.recipe()["rows"] != recipe.recipe()["rows"]
    with pytest.raises(ConfigError, match=r"integer 'answer' column.*'Tom has \d+ pens.*seven"):
        other.warm_start_examples()

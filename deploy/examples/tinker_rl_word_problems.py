"""RL on arithmetic word problems through the Tinker API, with the `tinker` SDK only: any
server that speaks it (`lorafleet serve deploy/configs/serve_word_problems.yaml`, docs/tinker.md).

Each step samples a group of answers to a batch of prompts from the current weights, scores an
answer 1.0 when its last number is the row's answer, centres the rewards within each group
(GRPO) and takes one importance-sampling policy-gradient step. A held-out slice (the file's
last rows) is answered greedily before and after training.

    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local \\
        python deploy/examples/tinker_rl_word_problems.py --steps 10

Names end in their dimensions: _P prompts of a batch, _G a prompt's group of samples, _T
tokens, _D datums.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

import tinker
from tinker import types

DATA = Path(__file__).resolve().parents[1] / "data" / "word_problems.jsonl"
INTEGER = re.compile(r"-?\d+")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL"),
                        help="the server (default: $TINKER_BASE_URL)")
    parser.add_argument("--model", help="the base model (default: the server's first)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="JSONL rows: a `prompt` conversation and an integer `answer`")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out rows (the last)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def get_reward(response: str, answer: str) -> float:
    numbers = INTEGER.findall(response.replace(",", ""))
    return 1.0 if numbers and int(numbers[-1]) == int(answer) else 0.0


def load_problems(path: Path) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def render(tokenizer, conversation: list[dict]) -> types.ModelInput:
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                         tokenize=False)
    return types.ModelInput.from_ints(tokenizer.encode(text, add_special_tokens=False))


def greedy_accuracy(sampling_client, tokenizer, rows: list[dict], max_tokens: int) -> float:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                  stop=[tokenizer.eos_token_id])
    futures = [sampling_client.sample(render(tokenizer, row["prompt"]), 1, params)
               for row in rows]
    responses = [f.result().sequences[0].tokens for f in futures]
    return sum(get_reward(tokenizer.decode(tokens, skip_special_tokens=True), row["answer"])
               for tokens, row in zip(responses, rows, strict=True)) / len(rows)


def group_datums(prompt: types.ModelInput, sequences, advantages_G: list[float]
                 ) -> list[types.Datum]:
    """One datum per sample: the prompt and the answer, shifted by one, with the sampler's
    log-probs and the sample's advantage on the answer's tokens (zero on the prompt's)."""
    prompt_len = prompt.length - 1
    datums_G = []
    for sequence, advantage in zip(sequences, advantages_G, strict=True):
        tokens_T = sequence.tokens
        datums_G.append(types.Datum(
            model_input=prompt.append(types.EncodedTextChunk(tokens=tokens_T[:-1])),
            loss_fn_inputs={
                "target_tokens": [0] * prompt_len + tokens_T,
                "logprobs": [0.0] * prompt_len + sequence.logprobs,
                "advantages": [0.0] * prompt_len + [advantage] * len(tokens_T),
            },
        ))
    return datums_G


def main() -> None:
    args = parse_args()
    service_client = tinker.ServiceClient(base_url=args.base_url)
    if args.model:
        model = args.model
    else:
        capabilities = tinker.RestClient(base_url=args.base_url).get_server_capabilities()
        model = capabilities.result().supported_models[0].model_name
    # train_unembed=False: LoRA on attention and MLP only (lorafleet serve samples no adapted
    # LM head)
    training_client = service_client.create_lora_training_client(
        base_model=model, rank=args.rank, seed=args.seed, train_unembed=False).result()
    tokenizer = training_client.get_tokenizer()

    problems = load_problems(args.data)
    held_out, train = problems[-args.eval_size:], problems[:-args.eval_size]
    random.Random(args.seed).shuffle(train)
    base_sampler = service_client.create_sampling_client(base_model=model).result()
    print(f"model {model}: {len(train)} training prompts, {len(held_out)} held out", flush=True)
    print(f"held-out greedy accuracy before: "
          f"{greedy_accuracy(base_sampler, tokenizer, held_out, args.max_tokens):.3f}", flush=True)

    sampling_params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0,
                                           stop=[tokenizer.eos_token_id])
    adam_params = types.AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.95, eps=1e-8)
    for step in range(args.steps):
        t_start = time.time()
        start = step * args.batch % len(train)
        rows_P = train[start:start + args.batch]
        sampling_client = training_client.save_weights_and_get_sampling_client().result()
        prompts_P = [render(tokenizer, row["prompt"]) for row in rows_P]
        futures_P = [sampling_client.sample(prompt, args.group, sampling_params)
                     for prompt in prompts_P]

        datums_D: list[types.Datum] = []
        rewards_P: list[float] = []
        for future, prompt, row in zip(futures_P, prompts_P, rows_P, strict=True):
            sequences = future.result().sequences
            rewards_G = [get_reward(tokenizer.decode(s.tokens, skip_special_tokens=True),
                                    row["answer"]) for s in sequences]
            mean_reward = sum(rewards_G) / len(rewards_G)
            rewards_P.append(mean_reward)
            if all(reward == mean_reward for reward in rewards_G):
                continue  # every sample alike: no signal in this group
            datums_D += group_datums(prompt, sequences, [r - mean_reward for r in rewards_G])

        if datums_D:
            fwd_bwd_future = training_client.forward_backward(datums_D, "importance_sampling")
            optim_future = training_client.optim_step(adam_params)
            fwd_bwd_future.result()
            optim_future.result()
        print(f"step {step}  reward {sum(rewards_P) / len(rewards_P):.3f}  "
              f"datums {len(datums_D)}  {time.time() - t_start:.1f}s", flush=True)

    sampling_client = training_client.save_weights_and_get_sampling_client().result()
    print(f"held-out greedy accuracy after: "
          f"{greedy_accuracy(sampling_client, tokenizer, held_out, args.max_tokens):.3f}",
          flush=True)
    print(f"saved state: {training_client.save_state('final').result().path}", flush=True)


if __name__ == "__main__":
    main()

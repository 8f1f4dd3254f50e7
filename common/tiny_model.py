"""The embedded default model, built offline: a `tokenizers`-trained tokenizer, a small
Llama-architecture (or, with `architecture=qwen2`, Qwen2) causal LM, and a short
full-parameter SFT warm start so it can do the task at all. The result is saved with
`save_pretrained` and cached by the hash of its recipe, so vLLM, PEFT and HF all load it like
any hub model.

The warm start's floats depend on the CPU's kernels (Intel and AMD builds of the same recipe
differ), so the models of the shipped configs are built once and shipped as package data
(`common/models/`, ~4 MB each): every machine starts from the same bytes. Other recipes (other
tasks, sizes, `model.tiny.*` overrides) are built on first use and cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .cache import cache_root
from .data import render_prompt
from .progress import progress
from .tasks.base import ModelRecipe

RECIPE_VERSION = 1  # bump when the build code changes what it produces
SHIPPED_MODELS = Path(__file__).parent / "models"
RECIPE_FILE = "lorafleet_recipe.json"  # what a built model was built from


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim 32: the smallest head size vLLM's CPU attention supports
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    sft_steps: int = 1000
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    seed: int = 0
    # qwen2: bias on q/k/v (vLLM packs them as qkv_proj, as it packs gate/up for both)
    architecture: Literal["llama", "qwen2"] = "llama"

    def hashed(self) -> dict:
        """What the recipe hash covers: the shipped Llama models predate `architecture`."""
        spec = asdict(self)
        if spec["architecture"] == "llama":
            del spec["architecture"]
        return spec


# The tokenizer class AutoTokenizer gives a built model of each architecture (its model-type
# rules; tests/unit/test_data.py holds every shipped model to it).
TOKENIZER_CLASSES = {"llama": "TokenizersBackend", "qwen2": "Qwen2Tokenizer"}


def load_tokenizer(model_path: str):
    """The model's tokenizer, as AutoTokenizer gives it. A model lorafleet built is loaded by
    its architecture's class directly: AutoTokenizer's model-type lookup imports torch and
    much of transformers, 5 s of a driver's start on 2 cores."""
    import transformers

    path = Path(model_path)
    if (path / RECIPE_FILE).exists():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type in TOKENIZER_CLASSES:
            return getattr(transformers, TOKENIZER_CLASSES[model_type]).from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(model_path)


def build_tokenizer(corpus: list[str], recipe: ModelRecipe):
    """A byte-level BPE tokenizer (GPT-2 style, so any text round-trips) over the task's corpus;
    digits stay single tokens so numbers compose. A chat recipe's tokens are special and the
    last of them (the end of a turn) is the EOS, so generation stops after one reply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *recipe.chat_tokens]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=specials[-1] if recipe.chat_tokens
        else "</s>", pad_token="<pad>", unk_token="<unk>", clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = recipe.chat_template
    return tokenizer


def _init_model(spec: TinyModelSpec, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[spec.architecture]
    torch.manual_seed(spec.seed)
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = model_class(config)
    # HF's std-0.02 init leaves a tiny model's logits near uniform-flat; a wider output layer
    # gives sampling at temperature 1 a distribution that RL can sharpen.
    torch.nn.init.normal_(model.lm_head.weight, std=spec.hidden_size**-0.5)
    return model


def sft_batches(tokenizer, recipe: ModelRecipe, batch_size: int, seed: int):
    """Endless shuffled batches of (input_ids, attention_mask, labels) of the task's warm-start
    prompts (rendered as the rollouts render them) with the teacher's answers (addition and
    datasets: biased; NLU: unlabelled text after an empty prompt, i.e. language modelling);
    the loss covers the answer only."""
    import random

    import torch

    rng = random.Random(seed)
    examples = recipe.warm_start_examples()
    prompts = [render_prompt(ex, tokenizer)[1] for ex in examples]
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = []
            for i in order[start : start + batch_size]:
                answer = tokenizer(recipe.demonstration(examples[i], rng), add_special_tokens=False)
                rows.append((prompts[i], answer.input_ids + [tokenizer.eos_token_id]))
            width = max(len(p) + len(a) for p, a in rows)
            ids = torch.full((batch_size, width), tokenizer.pad_token_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (p, a) in enumerate(rows):
                ids[row, : len(p) + len(a)] = torch.tensor(p + a)
                labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
                mask[row, : len(p) + len(a)] = 1
            yield ids, mask, labels


def warm_start(model, tokenizer, recipe: ModelRecipe, spec: TinyModelSpec) -> float:
    """Short full-parameter SFT on the task's warm-start examples; returns the last loss (NaN
    with spec.sft_steps 0: the model stays at its random init)."""
    import torch

    if spec.sft_steps == 0:
        return float("nan")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.sft_lr, total_steps=spec.sft_steps)
    batches = sft_batches(tokenizer, recipe, spec.sft_batch_size, spec.seed)
    bar = progress(range(spec.sft_steps), desc="warm-start SFT", unit="step")
    loss = torch.tensor(float("nan"))
    for _ in bar:
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return float(loss.item())


def recipe_hash(recipe: ModelRecipe, spec: TinyModelSpec) -> str:
    hashed = {"version": RECIPE_VERSION, "task": recipe.recipe(), "spec": spec.hashed()}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]


def model_name(recipe: ModelRecipe, spec: TinyModelSpec) -> str:
    return f"tiny-{recipe.recipe()['name']}-{recipe_hash(recipe, spec)}"


def build_tiny_model(recipe: ModelRecipe, spec: TinyModelSpec, root: Path | None = None) -> Path:
    """Returns the directory of the model: the shipped one for this recipe if there is one,
    else the cached build, building it once per recipe (file-locked)."""
    shipped = SHIPPED_MODELS / model_name(recipe, spec)
    if root is None and (shipped / "config.json").exists():
        return shipped
    root = root or cache_root()
    target = root / "models" / model_name(recipe, spec)
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # another process built it while we waited
            return target
        tokenizer = build_tokenizer(list(recipe.tokenizer_corpus()), recipe)
        model = _init_model(spec, tokenizer)
        final_loss = warm_start(model, tokenizer, recipe, spec)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"task": recipe.recipe(), "spec": asdict(spec), "sft_final_loss": final_loss}
        (staging / RECIPE_FILE).write_text(json.dumps(record, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def ship_tiny_model(recipe: ModelRecipe, spec: TinyModelSpec) -> Path:
    """Builds the recipe afresh on this machine and stores it under SHIPPED_MODELS (package
    data, committed) so that every machine loads these bytes instead of building its own."""
    with tempfile.TemporaryDirectory() as tmp:
        built = build_tiny_model(recipe, spec, Path(tmp))
        target = SHIPPED_MODELS / built.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(built, target)
    return target

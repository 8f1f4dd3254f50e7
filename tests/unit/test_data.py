"""The pad id every padded batch uses: a tokenizer without a pad token (most hub tokenizers,
e.g. Llama's and Qwen base models') pads with its EOS; a built model's tokenizer loaded
directly is AutoTokenizer's."""

from __future__ import annotations

import copy

import pytest

from lorafleet.common.data import pad_token_id
from lorafleet.common.tiny_model import RECIPE_FILE, SHIPPED_MODELS, load_tokenizer
from lorafleet.learner.model import collate


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tokenizer):
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id  # the embedded one has its own
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    pad = pad_token_id(no_pad)
    assert pad == no_pad.eos_token_id
    batch = collate([[5, 6, 7], [5]], [[8], [9, 10]], pad)  # None here was a torch error
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 10, pad]]
    no_pad.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        pad_token_id(no_pad)


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED_MODELS.iterdir()
                                        if (p / "config.json").exists()))
def test_a_built_models_tokenizer_loads_as_autotokenizer_gives_it(name, tmp_path):
    """load_tokenizer's direct path (no AutoTokenizer import) gives what AutoTokenizer does:
    the class, the ids of plain and chat text, the special tokens; a directory without the
    recipe file goes through AutoTokenizer."""
    import shutil

    from transformers import AutoTokenizer

    path = SHIPPED_MODELS / name
    direct, auto = load_tokenizer(str(path)), AutoTokenizer.from_pretrained(path)
    assert type(direct) is type(auto)
    texts = ["12 + 7 =", "The film was good.\n", " <s> </s> x"]
    assert [direct(t).input_ids for t in texts] == [auto(t).input_ids for t in texts]
    assert direct.chat_template == auto.chat_template
    if auto.chat_template:
        conversation = [{"role": "user", "content": "What is 3 + 4?"}]
        assert direct.apply_chat_template(conversation, add_generation_prompt=True) == \
            auto.apply_chat_template(conversation, add_generation_prompt=True)
    assert (direct.bos_token_id, direct.eos_token_id, direct.pad_token_id) == \
        (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
    plain = tmp_path / "plain"
    shutil.copytree(path, plain, ignore=shutil.ignore_patterns(RECIPE_FILE))
    assert load_tokenizer(str(plain))(texts[0]).input_ids == auto(texts[0]).input_ids

"""The pad id every padded batch uses: a tokenizer without a pad token (most hub tokenizers,
e.g. Llama's and Qwen base models') pads with its EOS."""

from __future__ import annotations

import copy

import pytest

from lorafleet.common.data import pad_token_id
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

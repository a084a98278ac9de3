"""Real subword tokenizers trained inside the tests on the built-in datasets (no download).

* :func:`sentencepiece_llama_tokenizer`: a SentencePiece BPE model (byte fallback) trained with the
  ``sentencepiece`` library and wrapped the way Llama 2's published ``tokenizer.json`` wraps its model: normalizer
  prepend '▁' then replace ' ' with '▁', no pre-tokenizer, ``<s>`` prepended. A lone ``" positive"`` then tokenizes
  to ``['▁', '▁positive']`` (the legacy prefix-space behaviour), while ``"Sentiment: positive"`` ends in
  ``'▁positive'``.
* :func:`byte_level_bpe_tokenizer`: a GPT-2 style byte-level BPE trained with ``tokenizers`` (offsets include the
  leading space, no BOS).

The training corpus is every built-in text and every built-in demonstration (template filled with its label word
and with its symbol), so that those become single tokens as they are for real models.
"""

from __future__ import annotations

import copy

import io
from pathlib import Path

from extraction.prompts import SYMBOLS
from extraction.tasks import BUILTIN, load_task

SPECIALS = ("<unk>", "<s>", "</s>")


def corpus() -> list[str]:
    """Built-in texts and their demonstrations (``template`` filled with the text and its label word or symbol)."""
    lines = []
    for name in BUILTIN:
        task = load_task(name)
        for text, label in zip(task.texts, task.labels):
            lines.append(text)
            lines.append(task.template.format(text=text, label=task.label_words[label]))
            lines.append(task.template.format(text=text, label=SYMBOLS[label]))
    return lines


def sentencepiece_llama_tokenizer(directory: Path | None = None, vocab_size: int = 1500):
    """A Llama-2-style fast tokenizer over a SentencePiece BPE model trained here (see the module docstring)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=stream, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", minloglevel=2, num_threads=1,
    )
    processor = spm.SentencePieceProcessor(model_proto=stream.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    core = Tokenizer(models.BPE(vocab, _merges(vocab), unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that rebuild SentencePiece's pieces: every split of a piece into two pieces, in piece order."""
    merges = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def byte_level_bpe_tokenizer(directory: Path | None = None, vocab_size: int = 1500):
    """A GPT-2 style byte-level BPE fast tokenizer trained here (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer


def left_padded(tokenizer):
    """A copy padding on the left with a pad token, as ``extraction.load_model`` sets a tokenizer up."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

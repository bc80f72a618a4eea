"""Tiny BERT checkpoints written on the fly, for tests of the text backbone and recipe.

Each writer makes a randomly initialised 2-layer, width-16 BERT in one on-disk format, so the
tests run in seconds and never touch the network.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import keras_hub
import numpy as np
from safetensors.numpy import save_file

WORDS = "the a movie film was great good bad awful plot acting boring fun loved hated it i".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TINY = {
    "num_layers": 2,
    "hidden_dim": 16,
    "num_heads": 2,
    "intermediate_dim": 32,
    "max_sequence_length": 64,
}


def write_hf_checkpoint(
    directory: Path, *, seed: int = 0, vocab: list[str] = VOCAB, **config_overrides
) -> dict:
    """Writes a random Hugging Face BERT checkpoint (config.json, model.safetensors, vocab.txt)."""
    directory.mkdir(parents=True, exist_ok=True)
    h, inner, layers = TINY["hidden_dim"], TINY["intermediate_dim"], TINY["num_layers"]
    config = {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": len(vocab),
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": TINY["num_heads"],
        "intermediate_size": inner,
        "max_position_embeddings": TINY["max_sequence_length"],
        "type_vocab_size": 2,
        **config_overrides,
    }
    rng = np.random.default_rng(seed)

    def random(*shape):
        return rng.normal(0.0, 0.02, size=shape).astype("float32")

    tensors = {
        "embeddings.word_embeddings.weight": random(config["vocab_size"], h),
        "embeddings.position_embeddings.weight": random(config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": random(2, h),
        "embeddings.LayerNorm.weight": np.ones(h, "float32"),
        "embeddings.LayerNorm.bias": np.zeros(h, "float32"),
        "pooler.dense.weight": random(h, h),
        "pooler.dense.bias": random(h),
    }
    for i in range(layers):
        prefix = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            tensors[f"{prefix}attention.self.{name}.weight"] = random(h, h)
            tensors[f"{prefix}attention.self.{name}.bias"] = random(h)
        tensors[f"{prefix}attention.output.dense.weight"] = random(h, h)
        tensors[f"{prefix}attention.output.dense.bias"] = random(h)
        tensors[f"{prefix}intermediate.dense.weight"] = random(inner, h)
        tensors[f"{prefix}intermediate.dense.bias"] = random(inner)
        tensors[f"{prefix}output.dense.weight"] = random(h, inner)
        tensors[f"{prefix}output.dense.bias"] = random(h)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{prefix}{norm}.weight"] = np.ones(h, "float32")
            tensors[f"{prefix}{norm}.bias"] = np.zeros(h, "float32")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def write_keras_preset(directory: Path) -> keras.Model:
    """Saves a random tiny BertBackbone and its tokenizer as a keras-hub preset directory."""
    bert = keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), **TINY)
    bert.save_to_preset(str(directory))
    keras_hub.models.BertTokenizer(vocabulary=VOCAB).save_to_preset(str(directory))
    return bert


def write_masked_lm_preset(directory: Path) -> keras.Model:
    """Saves a random tiny BertMaskedLM (backbone, masked-LM head, tokenizer) as a preset."""
    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), **TINY)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCAB)
    preprocessor = keras_hub.models.BertMaskedLMPreprocessor(tokenizer, sequence_length=16)
    task = keras_hub.models.BertMaskedLM(bert, preprocessor=preprocessor)
    task.save_to_preset(str(directory))
    return task


# === Labelled reviews for the text recipe ===

POSITIVE = [
    "i loved it",
    "great fun",
    "good film",
    "the acting was great",
    "loved the plot",
    "a good movie",
    "it was fun",
    "great plot",
    "good acting",
    "i loved the film",
]
NEGATIVE = [
    "i hated it",
    "awful film",
    "bad movie",
    "the acting was awful",
    "boring plot",
    "a bad film",
    "it was boring",
    "awful plot",
    "bad acting",
    "i hated the movie",
]


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_review_files(root: Path) -> tuple[str, str]:
    """`train.csv` (the reviews twice) and a four-row `test.csv`, classes "neg" and "pos"."""
    rows = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    train = write_csv(root / "train.csv", rows * 2)
    test = write_csv(
        root / "test.csv",
        [
            ("great movie", "pos"),
            ("awful acting", "neg"),
            ("fun film", "pos"),
            ("boring film", "neg"),
        ],
    )
    return train, test

"""Datasets of the example lm-evaluation-harness tasks: JSONL files beside this module, read
without the Hugging Face Hub (``custom_dataset`` in the task YAMLs)."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name):
    import datasets

    return datasets.DatasetDict({"test": datasets.load_dataset(
        "json", data_files=str(HERE / name), split="train")})


def agreement(**kwargs):
    return _load("agreement.jsonl")


def capitals(**kwargs):
    return _load("capitals.jsonl")

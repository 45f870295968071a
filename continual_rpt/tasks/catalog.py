"""The continual-learning benchmarks' datasets, declared as custom tasks, usable by name in a stream.

The standard CL benchmark (AG News, Amazon, Yelp, DBpedia, Yahoo) and the 15-task long sequence
(adds MNLI, QQP, IMDB, SST-2 and six SuperGLUE tasks) of Progressive Prompts. Two sources:
- the hub (`HUB_TASKS`); Amazon reviews (5 classes, Zhang et al. 2015) has no maintained copy there;
- a local folder in the layout O-LoRA, SAPT and later papers ship (`CL_LAYOUT`): per task
  `<root>/<folder>/{train,test}.json`, each one JSON array of `{"label": name, "sentence": text}`,
  and `labels.json` with the class names. Their dev.json is a copy of test.json, so test.json is
  halved into dev and test here, as SuperGLUE's validation files are.
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import DataError
from .custom import CustomTaskConfig

HUB_TASKS: dict[str, CustomTaskConfig] = {
    c.name: c
    for c in (
        CustomTaskConfig("ag", ("World", "Sports", "Business", "Sci/Tech"), "text", hub="fancyzhx/ag_news"),
        CustomTaskConfig("yelp", ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"), "text",
                         hub="Yelp/yelp_review_full", hub_config="yelp_review_full"),
        CustomTaskConfig("dbpedia", ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                                     "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                                     "Album", "Film", "WrittenWork"), ("title", "content"),
                         hub="fancyzhx/dbpedia_14", hub_config="dbpedia_14"),
        CustomTaskConfig("yahoo", ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
                                   "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
                                   "Family & Relationships", "Politics & Government"),
                         ("question_title", "question_content", "best_answer"), label="topic",
                         hub="community-datasets/yahoo_answers_topics", hub_config="yahoo_answers_topics"),
        CustomTaskConfig("mnli", ("entailment", "neutral", "contradiction"), "premise", "hypothesis",
                         hub="nyu-mll/glue", hub_config="mnli", hub_eval_split="validation_matched"),
        CustomTaskConfig("qqp", ("not_duplicate", "duplicate"), "question1", "question2",
                         hub="nyu-mll/glue", hub_config="qqp", hub_eval_split="validation"),
        CustomTaskConfig("imdb", ("neg", "pos"), "text", hub="stanfordnlp/imdb", hub_config="plain_text"),
        CustomTaskConfig("sst2", ("negative", "positive"), "sentence", hub="nyu-mll/glue", hub_config="sst2",
                         hub_eval_split="validation"),
    )
}


# Task name -> its folder in the CL benchmark layout.
CL_LAYOUT: dict[str, str] = {
    "ag": "TC/agnews", "amazon": "SC/amazon", "yelp": "SC/yelp", "dbpedia": "TC/dbpedia", "yahoo": "TC/yahoo",
    "mnli": "NLI/MNLI", "qqp": "QQP/QQP", "sst2": "SC/SST-2", "imdb": "SC/IMDB", "boolqa": "BoolQA/BoolQA",
}
SPLIT_FROM = ("", "train", "test")  # DataConfig.split_from: carve every split out of this one file


def catalog_task(name: str, root: str | Path | None, split_from: str = "") -> CustomTaskConfig:
    """The declaration of catalog task `name`: from `root` in the CL benchmark layout when given, else from the hub.

    split_from names the one file of the task folder that train, dev and test are all carved from
    (seeded), for the tasks whose stored copy lacks a file (Yelp and IMDB test, DBpedia train).
    """
    if split_from not in SPLIT_FROM:
        raise ValueError(f"split_from: {split_from!r} is not one of train, test (or empty)")
    if root is None:
        if name not in HUB_TASKS:
            raise DataError(f"{name}: has no copy on the Hugging Face hub; give a data folder in the CL benchmark layout "
                            f"(--data-dir / $CRPT_DATA_DIR holding {CL_LAYOUT[name]}/) or declare it as a custom task")
        if split_from:
            raise ValueError(f"split_from: applies to a data folder in the CL benchmark layout; {name} is read from the hub")
        return HUB_TASKS[name]
    folder = Path(root).resolve() / CL_LAYOUT[name]  # relative to the working directory, as a SuperGLUE data_dir is
    labels_path = folder / "labels.json"
    if not labels_path.is_file():
        raise DataError(f"{labels_path} not found: {root} does not hold {name} in the CL benchmark layout "
                        f"({CL_LAYOUT[name]}/labels.json, train.json, test.json); give the folder that does, "
                        "or read the task from the hub (data: {source: hub})")
    try:
        labels = json.loads(labels_path.read_text())
    except ValueError as err:
        raise DataError(f"{labels_path}: not JSON ({err})") from None
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)) or len(set(labels)) != len(labels):
        raise DataError(f"{labels_path}: expected a JSON array of distinct label names, got {str(labels)[:80]}")
    # The data files are checked when they are read (tasks.custom), so that a stream parses where only labels are stored.
    if split_from:
        files = {"train": folder / f"{split_from}.json", "validation": None}
    else:
        files = {"train": folder / "train.json", "validation": folder / "test.json"}
    return CustomTaskConfig(name, tuple(labels), "sentence", train=str(files["train"]),
                            validation=str(files["validation"]) if files["validation"] else None,
                            unknown_labels="skip", split_from="train" if split_from else None)

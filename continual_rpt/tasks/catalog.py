"""Hub datasets of the continual-learning benchmarks, declared as custom tasks, usable by name in a stream.

The standard CL benchmark (AG News, Amazon, Yelp, DBpedia, Yahoo) and the 15-task long sequence
(adds MNLI, QQP, IMDB, SST-2 and six SuperGLUE tasks) of Progressive Prompts. Amazon reviews
(5 classes, Zhang et al. 2015) has no maintained copy on the hub, so it is declared in the stream
files with local CSVs instead.
"""

from __future__ import annotations

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

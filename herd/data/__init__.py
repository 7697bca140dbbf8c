"""The pretraining data pipeline: readers -> filters -> de-duplication -> classifiers -> mix -> token shards."""

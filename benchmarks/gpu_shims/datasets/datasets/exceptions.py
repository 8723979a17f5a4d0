"""``datasets.exceptions`` as pipeline/data/dataset.py catches it."""


class DatasetGenerationError(Exception):
    pass

"""The tables of a caption run's output folder (written by :class:`pipeline.captioning.CaptionTables`): their
file names and columns. No torch: the search service reads ``captions.parquet`` by this name, and its shard
replicas import the service's modules."""

CAPTIONS_FILE = "captions.parquet"  # a caption run's output table, one row per captioned video
SCORES_FILE = "caption_scores.parquet"  # --score-captions: every ingest caption scored by the captioner
ERRORS_FILE = "errors.parquet"  # the videos that could not be captioned, with the reason
CAPTION_COLUMNS = ("video_id", "key", "caption", "score", "model_id")
SCORE_COLUMNS = ("video_id", "caption", "score", "model_id")
ERROR_COLUMNS = ("key", "video_id", "reason", "message")

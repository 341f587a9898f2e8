"""Typed config of the mining job's own sections: the teacher and the plan parameters.

``clray mine CONFIG`` reads a TOML with ``[data]`` (the training corpus, exactly as in a
training config), ``[teacher]``, ``[mining]``, ``[output]`` and ``[storage]``: a
``MineConfig``; ``pipelines.mining.job`` runs it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clray.models.config import Strict
from clray.pipelines.config import DataConfig
from clray.pipelines.storage import StorageConfig


class TeacherConfig(Strict):
    path: str
    """Local directory of the teacher: a clray export (``clray train`` writes one to
    run_dir/export; its anchor tower embeds the anchor view and its positive tower the
    positive view) or a Hugging Face / sentence-transformers text model saved with
    save_pretrained (one tower for both views; both views must be text)."""
    kind: Literal["auto", "clray", "hf"] = "auto"
    """auto: a directory with clray_model.json is a clray export, else a Hugging Face model."""
    pooling: Literal["auto", "mean", "cls"] = "auto"
    """Hugging Face teachers: how token states become one vector. auto: what the
    sentence-transformers pooling config says (1_Pooling/config.json), else mean."""
    max_length: int = Field(default=128, ge=2)
    """Hugging Face teachers: tokens per text after truncation."""
    batch_size: int = Field(default=32, ge=1)
    """Rows per teacher forward pass. On CPU small forwards are faster: the rows of a
    block are sorted by length, so a smaller batch also pads less (32: about 1.15x the
    texts/s of 128 on codesearch's texts, one thread, 2-core machine)."""
    block_rows: int = Field(default=2048, ge=1)
    """Rows a teacher actor takes at once: sorted by token length within the block, then
    embedded batch_size at a time, each forward padded to its own longest row (the
    block's order is restored on write). Larger blocks pad less and hold more memory."""
    num_actors: int = Field(default=1, ge=1)
    """Teacher replicas (Ray Data actor pool); each loads the model once."""
    cpus_per_actor: float = Field(default=1.0, gt=0)
    """CPUs each teacher actor reserves; also its torch thread count."""
    use_gpu: Literal["auto", "always", "never"] = "auto"
    """auto: one GPU per teacher actor when the Ray cluster has GPUs, else CPU."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each teacher actor asks for, to put the embedding on one node
    group, e.g. {"group:cpu_workers" = 1} on the simulated cluster (`clray jobs up
    --simulate`) or a resource your CPU nodes declare."""


class MiningConfig(Strict):
    batch_size: int = Field(ge=2)
    """Rows per mined batch: the training GLOBAL batch size (train.global_batch_size).
    With negatives gathered across workers every anchor is scored against the whole
    step, so the mined group is the step: each mined batch is split into num_workers
    local batches that are trained in the same step."""
    num_workers: int = Field(default=1, ge=1)
    """The training workers (scaling.num_workers) the plan is for; batch_size must be a
    multiple. Training at another worker count is refused (mine again)."""
    epochs: int = Field(default=1, ge=1)
    """Epoch plans to write, each with its own seed (seed + epoch). Training cycles
    through them when it runs more epochs."""
    seed: int = 0
    """Seeds community detection, batch order and negative sampling."""
    rank_min: int = Field(default=30, ge=0)
    """Skip each row's top rank_min teacher neighbours: near-duplicates and unlabelled
    positives are the likeliest false negatives (B3 skips 30)."""
    rank_max: int = Field(default=130, ge=1)
    """Keep neighbours up to this rank (exclusive); also the k of the kNN search (B3: 130)."""
    mutual: bool = True
    """Graph edges only between mutual neighbours (j in i's window and i in j's), as B3
    does: one-directional windows link every row to the corpus's hubs."""
    partition: Literal["metis", "leiden"] = "metis"
    """metis: a balanced partition into parts of exactly one batch (B3's recipe; pymetis).
    leiden: communities near community_size, cut and merged into batches."""
    groups_per_batch: int = Field(default=1, ge=1)
    """metis: groups per batch (TAS-B's balanced sampling): parts of batch_size /
    groups_per_batch rows, that many drawn into each batch. 1: a batch is one group."""
    random_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of each mined batch swapped for random rows (every row is still used once
    per epoch): keeps batches from being too pure for a model that has not yet learned
    the easy distinctions."""
    in_batch_scores: bool = False
    """Write each global batch's teacher similarities (anchor i vs positive j, batch_size
    x batch_size floats) beside it, so the loss can mask in-batch false negatives
    (loss.in_batch_margin with data.in_batch_score_column)."""
    in_batch_scores_column: str = "teacher_scores"
    margin: float | None = Field(default=0.05, ge=0, lt=1)
    """Positive-aware filter (NV-Retriever): drop a candidate whose teacher similarity
    to the anchor exceeds the anchor-positive similarity times (1 - margin). None: off."""
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    """Nearest-neighbour index. auto: exact (flat) below exact_threshold rows, IVF above."""
    exact_threshold: int = Field(default=50_000, ge=0)
    nprobe: int = Field(default=32, ge=1)
    """IVF lists searched per query (recall vs time)."""
    nlist: int | None = Field(default=None, ge=1)
    """IVF lists; default 4 * sqrt(rows)."""
    search_actors: int = Field(default=0, ge=0)
    """Ray actors sharing the kNN queries (each holds the index once); 0: one per CPU
    Ray has, at most 8."""
    search_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each search actor asks for (as teacher.resources)."""
    search_chunk_rows: int = Field(default=16384, ge=1)
    """Queries per search task; each finished chunk is kept, so a killed job resumes."""
    community_size: int = Field(default=0, ge=0)
    """Target community size for Leiden; 0: twice batch_size. Leiden's communities come
    out somewhat smaller than asked, and a community smaller than a batch forces every
    batch to mix communities: at 2x the batch, batches are mostly cut from one community
    (mined/random in-batch similarity 3.2x vs 2.9x at 1x on the clustered corpus, 4.5x
    vs 3.6x on the quickstart)."""
    num_negatives: int = Field(default=0, ge=0)
    """Mined hard negatives per anchor written beside each batch (0: none). From the
    same rank window and filter as the graph; rows with too few candidates are topped up
    with random rows that pass the filter, and counted."""
    negative_strategy: Literal["top", "random"] = "top"
    """top: the most similar kept candidates; random: a seeded draw among them."""
    negatives_column: str = "hard_negatives"
    negative_ids_column: str = "hard_negative_ids"
    negative_scores_column: str = "hard_negative_scores"
    batches_per_file: int = Field(default=256, ge=1)
    """Packed batches per Parquet file."""

    @model_validator(mode="after")
    def _window(self) -> MiningConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size = {self.batch_size} is not a multiple of num_workers = {self.num_workers}: a mined "
                "batch is the global batch, split evenly over the workers; set batch_size to "
                "train.global_batch_size"
            )
        if self.batch_size % self.groups_per_batch:
            raise ValueError(f"groups_per_batch = {self.groups_per_batch} must divide batch_size = {self.batch_size}")
        if self.partition == "leiden" and (self.groups_per_batch > 1 or self.random_fraction > 0):
            raise ValueError('groups_per_batch and random_fraction need partition = "metis"')
        if self.rank_min >= self.rank_max:
            raise ValueError(
                f"rank_min = {self.rank_min} must be below rank_max = {self.rank_max}: the window "
                "[rank_min, rank_max) of each row's neighbours would be empty"
            )
        return self

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    @property
    def target_community_size(self) -> int:
        return self.community_size or 2 * self.batch_size


class OutputConfig(Strict):
    dir: str
    """The plan directory (manifest.json, plans/, quarantine, work/). Rerunning into it
    resumes an unfinished job; `data.train = DIR` with `data.batches = "packed"` trains
    on it."""


class MineConfig(Strict):
    """A whole mining job: the corpus, the teacher, the plan parameters and where it goes."""

    data: DataConfig
    """The corpus, as in a training config: data.train shards, the anchor and positive
    views, id_column and (optional) label_column. data.eval is not mined."""
    teacher: TeacherConfig
    mining: MiningConfig
    output: OutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """How to reach s3:// URIs in data.train and output.dir; credentials from the AWS chain."""

    @model_validator(mode="after")
    def _no_negatives(self) -> MineConfig:
        if self.data.negatives is not None:
            raise ValueError(
                "data.negatives: the mining job writes hard negatives itself (mining.num_negatives); "
                "remove data.negatives from the mining config"
            )
        return self

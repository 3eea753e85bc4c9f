"""A synthetic shopping benchmark with graded relevance, in Marqo-GS-10M's schema.

Products have attributes (colour, shape, pattern, size, background). Images are drawn
from all of them with Pillow; titles name them with some noise (missing words, brand
words, shuffled order). Queries name a subset of colour/shape/pattern/size. A product's
relevance to a query is the fraction of the query's attributes it matches, plus noise;
each query's result list is ranked by it into positions and the three score columns.

Partial matches are in every result list, ranked below full matches: a model trained on
binary relevance (every listed pair a positive) learns to retrieve them but not to rank
them, which is what graded GCL weights are for.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from gcl.data.splits import SplitConfig, build_splits, unused_pairs
from gcl.errors import ConfigError
from gcl.outputs import DATA_OUTPUT, check_output, replaced_whole
from gcl.storage import file_sha256

COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 60, 170),
    "orange": (255, 127, 14),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
NOUNS = {"circle": "plate", "square": "tile", "triangle": "pennant", "diamond": "kite", "cross": "badge"}
PATTERNS = ("solid", "striped", "dotted", "checked")
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.9}
BACKGROUNDS = {"grey": (150, 150, 150), "beige": (225, 205, 170), "teal": (60, 140, 140)}
BRANDS = ("acme", "zenith", "nova", "orbit", "pico")
QUERY_ATTRIBUTES = ("size", "colour", "pattern", "shape")
IMAGE_SIZE = 64
# A query names each attribute or leaves it out, and names at least one: 4 * 9 * 5 * 6 - 1.
DISTINCT_QUERIES = (len(SIZES) + 1) * (len(COLOURS) + 1) * (len(PATTERNS) + 1) * (len(SHAPES) + 1) - 1


@dataclass
class SynthConfig:
    """Sizes and seed of the synthetic benchmark."""

    products: int = 2000
    queries: int = 700
    docs_per_query: int = 16
    title_noise: float = 0.2
    rank_noise: float = 0.15
    seed: int = 0

    def __post_init__(self):
        # Queries are drawn until this many distinct texts exist: more than there are would never end.
        if not 1 <= self.queries <= DISTINCT_QUERIES:
            raise ConfigError(
                f"synthetic benchmark: queries={self.queries}; the attribute vocabulary makes "
                f"1 to {DISTINCT_QUERIES} distinct queries (for more pairs, raise products or docs_per_query)"
            )
        for name in ("products", "docs_per_query"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthetic benchmark: {name}={getattr(self, name)}; it must be at least 1")


def _draw_product(attrs: dict, rng: np.random.Generator) -> bytes:
    """PNG bytes of a product image drawn from its attributes."""
    size = IMAGE_SIZE
    img = Image.new("RGB", (size, size), BACKGROUNDS[attrs["background"]])
    extent = SIZES[attrs["size"]] * size
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    half = extent / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=255)
    else:  # cross
        arm = half / 3
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=255)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=255)
    colour = COLOURS[attrs["colour"]]
    fill = Image.new("RGB", (size, size), colour)
    contrast = tuple(255 - c if sum(colour) > 380 else min(255, c + 110) for c in colour)
    pattern = ImageDraw.Draw(fill)
    if attrs["pattern"] == "striped":
        for x in range(0, size, 8):
            pattern.rectangle((x, 0, x + 3, size), fill=contrast)
    elif attrs["pattern"] == "dotted":
        for x in range(2, size, 9):
            for y in range(2, size, 9):
                pattern.ellipse((x, y, x + 4, y + 4), fill=contrast)
    elif attrs["pattern"] == "checked":
        for x in range(0, size, 8):
            for y in range(0, size, 8):
                if (x // 8 + y // 8) % 2:
                    pattern.rectangle((x, y, x + 7, y + 7), fill=contrast)
    img.paste(fill, (0, 0), mask)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _title(attrs: dict, rng: np.random.Generator, noise: float) -> str:
    words = [attrs["size"], attrs["colour"], attrs["pattern"], attrs["shape"], NOUNS[attrs["shape"]]]
    if rng.random() < noise:
        words.pop(int(rng.integers(0, 4)))  # a missing attribute word
    if rng.random() < noise:
        order = rng.permutation(len(words) - 1)
        words = [words[i] for i in order] + [words[-1]]
    if rng.random() < 0.5:
        words.insert(0, str(rng.choice(BRANDS)))
    return " ".join(words)


def _products(cfg: SynthConfig, rng: np.random.Generator) -> list[dict]:
    """Products with drawn attributes, a noisy title and an image drawn from the attributes."""
    products = []
    for i in range(cfg.products):
        attrs = {
            "colour": str(rng.choice(list(COLOURS))),
            "shape": str(rng.choice(SHAPES)),
            "pattern": str(rng.choice(PATTERNS)),
            "size": str(rng.choice(list(SIZES))),
            "background": str(rng.choice(list(BACKGROUNDS))),
        }
        products.append(
            {
                "product_id": f"p{i:06d}",
                "attrs": attrs,
                "title": _title(attrs, rng, cfg.title_noise),
                "image": _draw_product(attrs, rng),
            }
        )
    return products


def _queries(cfg: SynthConfig, rng: np.random.Generator) -> dict[str, dict]:
    """Distinct query texts -> the attribute values they name (1 to 4 attributes)."""
    queries: dict[str, dict] = {}
    while len(queries) < cfg.queries:
        n_attrs = int(rng.choice([1, 2, 2, 3, 3, 4]))
        drawn = set(rng.choice(QUERY_ATTRIBUTES, n_attrs, replace=False).tolist())
        chosen = [a for a in QUERY_ATTRIBUTES if a in drawn]
        values = {
            a: str(
                rng.choice(
                    list(COLOURS)
                    if a == "colour"
                    else SHAPES
                    if a == "shape"
                    else PATTERNS
                    if a == "pattern"
                    else list(SIZES)
                )
            )
            for a in chosen
        }
        queries.setdefault(" ".join(values[a] for a in chosen), values)
    return queries


def generate_pairs(cfg: SynthConfig) -> pd.DataFrame:
    """All scored pairs of the benchmark, in Marqo-GS-10M's columns (plus `grade`)."""
    rng = np.random.default_rng(cfg.seed)
    products = _products(cfg, rng)
    table = {a: np.array([p["attrs"][a] for p in products]) for a in QUERY_ATTRIBUTES}
    queries = _queries(cfg, rng)

    rows = []
    for qid, (text, values) in enumerate(queries.items()):
        matched = sum((table[a] == v).astype(float) for a, v in values.items()) / len(values)
        candidates = np.flatnonzero(matched > 0)
        if len(candidates) == 0:
            continue
        # Result lists mix full and partial matches, as a shopping engine's would.
        pick = candidates[np.argsort(-(matched[candidates] + rng.random(len(candidates))))][: cfg.docs_per_query]
        relevance = matched[pick] + rng.normal(0, cfg.rank_noise, len(pick))
        ranked = pick[np.argsort(-relevance, kind="stable")]
        n = len(ranked)
        for position, index in enumerate(ranked, start=1):
            product = products[index]
            rows.append(
                {
                    "query": text,
                    "title": product["title"],
                    "image": {"bytes": product["image"], "path": None},
                    "product_id": product["product_id"],
                    "query_id": qid,
                    "pair_id": len(rows),
                    "position": position,
                    "score_linear": (n - position + 1) / n,
                    "score_reciprocal": 1.0 / position,
                    "no_score": 1.0,
                    "grade": int(round(3 * matched[index])),
                }
            )
    return pd.DataFrame(rows)


def write_splits(
    splits: dict[str, pd.DataFrame],
    out: str | Path,
    extra: dict | None = None,
    query_col: str = "query_id",
    doc_col: str = "product_id",
) -> dict:
    """Write each split as `<out>/<split>.parquet` and a manifest with row counts and hashes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"splits": {}, **(extra or {})}
    for name, df in splits.items():
        path = out / f"{name}.parquet"
        df.to_parquet(path, index=False)
        manifest["splits"][name] = {
            "file": path.name,
            "rows": len(df),
            "queries": int(df[query_col].nunique()),
            "documents": int(df[doc_col].nunique()),
            "sha256": file_sha256(str(path)),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class LogConfig:
    """A search log over the benchmark's training queries, generated from their known grades:
    what a shop's logging would record, with the truth kept beside it (log-truth.json)."""

    sessions_per_query: int = 40
    """Searches of each query."""
    shown: int = 10
    """Products shown per search (the ranked list's length)."""
    eta: float = 1.0
    """Position bias: a product at position k is examined with probability 1 / k**eta."""
    ranker_noise: float = 0.25
    """The logging ranker orders a query's products by their grade plus this much Gaussian noise."""
    promotion: float = 1.5
    """The logging ranker also ranks by a promotion of each product (drawn once, uniform in [0, 1],
    unrelated to relevance: sponsorship, popularity) times this weight: what raw clicks learn back."""
    swap_rate: float = 0.3
    """Randomization: the chance that a search swaps two neighbouring positions of its list, which
    lets the log tell position bias from relevance."""
    sponsored: int = 0
    """Sponsored slots: each query's searches open with this many products of other queries'
    results (drawn once per query, true grade 0, in a random order per search), ahead of what the
    ranker ranks; examined, they are clicked at the click model's floor."""
    seed: int = 0

    def propensities(self) -> list[float]:
        return [1.0 / k**self.eta for k in range(1, self.shown + 1)]


LOG_COLUMNS = ("impression_id", "query_id", "query", "product_id", "position", "click", "add_to_cart", "purchase")


def generate_log(pairs: pd.DataFrame, cfg: LogConfig) -> pd.DataFrame:
    """Impressions of `pairs` (a query's products and their true grade, score_linear): per search,
    the logging ranker's list (by grade, the products' promotion and noise) with its random swaps,
    each shown product examined by its position's propensity and, if examined, clicked with a
    probability rising with its grade; add-to-cart and purchase follow a click, likelier for a
    higher grade. With `cfg.sponsored`, each list opens with that many products of other queries at
    grade 0 (log_truth gives every shown pair's grade). One row per product shown."""
    rng = np.random.default_rng(cfg.seed)
    theta = np.array(cfg.propensities())
    catalog = np.sort(pairs["product_id"].unique())
    promoted = dict(zip(catalog, rng.random(len(catalog)), strict=True))
    rows = {name: [] for name in LOG_COLUMNS}
    impression = 0
    for (query_id, query), group in pairs.groupby(["query_id", "query"], sort=True):
        grades = group["score_linear"].to_numpy(np.float64)
        products = group["product_id"].to_numpy()
        ranked_by = grades + cfg.promotion * np.array([promoted[p] for p in products])
        slots = np.arange(len(products), len(products) + cfg.sponsored)  # indices of the sponsored
        if cfg.sponsored:
            drawn = rng.choice(np.setdiff1d(catalog, products), size=cfg.sponsored, replace=False)
            products, grades = np.concatenate([products, drawn]), np.concatenate([grades, np.zeros(cfg.sponsored)])
        for _ in range(cfg.sessions_per_query):
            ranked = np.argsort(-(ranked_by + rng.normal(0, cfg.ranker_noise, len(ranked_by))), kind="stable")
            order = np.concatenate([rng.permutation(slots), ranked])[: cfg.shown]  # no slots: draws nothing
            if len(order) > 1 and rng.random() < cfg.swap_rate:
                k = rng.integers(0, len(order) - 1)
                order[[k, k + 1]] = order[[k + 1, k]]
            g = grades[order]
            examined = rng.random(len(order)) < theta[: len(order)]
            click = examined & (rng.random(len(order)) < 0.05 + 0.85 * g)
            cart = click & (rng.random(len(order)) < 0.1 + 0.5 * g)
            purchase = cart & (rng.random(len(order)) < 0.2 + 0.6 * g)
            columns = (
                impression,
                query_id,
                query,
                products[order],
                np.arange(1, len(order) + 1),
                click,
                cart,
                purchase,
            )
            for name, values in zip(LOG_COLUMNS, columns, strict=True):
                rows[name].append(np.broadcast_to(values, len(order)))
            impression += 1
    # One frame at the end: a frame per search made generating the log most of a grades test's time.
    log = pd.DataFrame({name: np.concatenate(parts) for name, parts in rows.items()})
    return log.astype({name: np.int64 for name in ("impression_id", "position", *LOG_COLUMNS[-3:])})


def log_truth(pairs: pd.DataFrame, log: pd.DataFrame) -> pd.DataFrame:
    """The true grade of every (query_id, product_id) the log shows: its score_linear in `pairs`
    (the pairs the log was generated from), 0 for a product of another query's results."""
    shown = log[["query_id", "product_id"]].drop_duplicates()
    truth = shown.merge(pairs[["query_id", "product_id", "score_linear"]], how="left", on=["query_id", "product_id"])
    return truth.rename(columns={"score_linear": "grade"}).fillna({"grade": 0.0})


def synthesize(
    out: str | Path, cfg: SynthConfig | None = None, split: SplitConfig | None = None, log: LogConfig | None = None
) -> dict:
    """Generate the benchmark and write train, the four evaluation splits and (unless the split
    config's validation fractions are 0) the four val_* splits to `out`: a new or empty directory,
    or gcl's data splits, which it replaces once the new ones are whole (gcl.outputs). With `log`,
    also a search log over the training queries (log/impressions.parquet, with log-truth.json: the
    propensities and grades it was drawn from) and the products' catalog (catalog.parquet)."""
    check_output(str(out), DATA_OUTPUT)
    cfg = cfg or SynthConfig()
    split = split or SplitConfig(seed=cfg.seed)
    pairs = generate_pairs(cfg)
    splits = build_splits(pairs, "query_id", "product_id", split)
    extra = {
        "generator": "gcl.data.synth",
        "config": asdict(cfg),
        "split": split.model_dump(),
        "unused_pairs": unused_pairs(pairs, splits),
    }
    with replaced_whole(str(Path(out).absolute())) as partial:
        manifest = write_splits(splits, partial, extra)
        if log is not None:
            train = splits["train"]
            (Path(partial) / "log").mkdir()
            impressions = generate_log(train, log)
            impressions.to_parquet(Path(partial) / "log" / "impressions.parquet", index=False)
            truth = {
                "config": asdict(log),
                "propensities": log.propensities(),
                "grades": "log-truth.parquet: the grade of every (query_id, product_id) the log shows",
            }
            # Beside the log, not in it: the grades' reader takes every file under log/.
            (Path(partial) / "log-truth.json").write_text(json.dumps(truth, indent=2))
            log_truth(train, impressions).to_parquet(Path(partial) / "log-truth.parquet", index=False)
            catalog = pairs.drop_duplicates("product_id")[["product_id", "title", "image"]]
            catalog.to_parquet(Path(partial) / "catalog.parquet", index=False)
        return manifest

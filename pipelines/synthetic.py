"""A synthetic clustered text corpus on which mined batches visibly beat random ones.

Each row is a (query, passage) pair about one of up to 64 topics (its cluster, the
``label``). Two signals are planted:

* **Topic words**: a query names three words of its cluster's twelve-word vocabulary and
  its passage three *other* words of the same vocabulary. No word belongs to two
  clusters, so a teacher (a sentence model, or plain lexical overlap) sees the clusters
  clearly and telling a passage apart from another cluster's is easy.
* **A distinguishing detail**: a made-up name (``"Kriven"``: a few word pieces for
  MiniLM, 4 to 7 characters) shared by a row's query and passage and by no other row,
  train or eval: ``"humidity, drizzle and breeze for Kriven"`` /
  ``"Kriven: thunderstorm, monsoon, blizzard"``. Since the passage
  paraphrases the topic with different words, the detail is the *only* thing that tells
  a row's passage apart from other passages of its cluster.

A random batch of 256 over 64 clusters holds about 4 rows per cluster, so almost all its
negatives are easy (another topic); a batch mined from the teacher's similarity graph
(communities of one cluster) holds same-cluster negatives, which only the detail
separates. Recall@1 over the eval split (same clusters, new rows and details) measures
whether a model learned to read the detail. Texts are short ASCII (at most
``MAX_CHARS`` = 62 characters, so the char tokenizer at ``max_length = 64`` sees all of
them with [CLS] and [SEP]) and plain English words for sentence models.

A few deliberately broken rows (ids ``bad-0000``, ...) go into the training shards so a
run shows the quarantine at work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clray.pipelines.quickstart import write_splits

MAX_CHARS = 62
"""Longest query or passage: with [CLS] and [SEP] it fits the char tokenizer's 64 tokens."""

# (cluster name, its topic vocabulary); no word appears in two clusters.
TOPICS: list[tuple[str, str]] = [
    ("astronomy", "telescope comet galaxy nebula planet asteroid eclipse meteor orbit quasar supernova stargazing"),
    ("cooking", "recipe oven simmer saucepan flour braise skillet seasoning marinade broth dough spatula"),
    ("football", "goalkeeper striker penalty midfielder stadium referee corner tackle offside league kickoff dribble"),
    ("gardening", "compost seedling pruning trowel mulch greenhouse perennial fertilizer hedge weeding topsoil blossom"),
    ("finance", "dividend mortgage portfolio interest loan equity bond inflation budget banker savings investor"),
    ("medicine", "surgeon diagnosis vaccine prescription patient clinic fever antibiotic nurse symptom therapy dosage"),
    ("music", "guitar melody orchestra violin chord symphony piano rhythm drummer concert tempo harmony"),
    ("weather", "rainfall thunderstorm forecast humidity drizzle hailstorm blizzard barometer breeze monsoon cloudburst frost"),
    ("computing", "compiler database software processor keyboard debugging server laptop algorithm programmer bytecode firmware"),
    ("sailing", "sailboat mast anchor harbor rudder yacht regatta mooring keel sailor tide jib"),
    ("birds", "sparrow eagle owl feathers nest pigeon hawk woodpecker migration songbird beak falcon"),
    ("railways", "locomotive railway platform timetable carriage conductor freight tracks station signalman sleeper boxcar"),
    ("painting", "canvas watercolor brushstroke easel portrait palette landscape gallery painter acrylic sketch fresco"),
    ("chemistry", "molecule reagent beaker titration catalyst solvent acid enzyme isotope compound precipitate alkaline"),
    ("law", "lawyer courtroom verdict judge lawsuit contract plaintiff attorney jury appeal testimony statute"),
    ("baking", "croissant pastry sourdough muffin baguette frosting cupcake rolling yeast pretzel brioche glaze"),
    ("mountaineering", "summit glacier crampons ridge climber altitude avalanche ropes piton basecamp crevasse sherpa"),
    ("fishing", "angler trout fishing bait reel salmon lure hook tacklebox carp riverbank net"),
    ("dentistry", "dentist toothache molar cavity braces enamel floss gums filling toothbrush orthodontist plaque"),
    ("architecture", "cathedral facade arch column dome skyscraper blueprint architect balcony atrium cornice vault"),
    ("volcanoes", "volcano lava magma eruption crater ash caldera geyser pumice basalt fumarole vent"),
    ("insects", "beetle butterfly caterpillar ant mosquito wasp larva cocoon dragonfly cricket termite moth"),
    ("coffee", "espresso barista latte cappuccino beans roastery grinder mocha crema arabica decaf percolator"),
    ("aviation", "pilot runway cockpit airliner propeller hangar turbulence jetliner airfield glider fuselage takeoff"),
    ("chess", "checkmate bishop knight pawn rook gambit grandmaster chessboard castling endgame stalemate queen"),
    ("fashion", "couture dress fabric tailor catwalk designer boutique silk sewing jacket hemline mannequin"),
    ("dogs", "puppy leash kennel terrier retriever barking poodle beagle collar obedience spaniel fetch"),
    ("oceans", "coral reef dolphin whale seabed lagoon plankton shark jellyfish seaweed ocean kelp"),
    ("elections", "ballot voter candidate campaign polling senator parliament referendum vote electorate primary mayor"),
    ("cycling", "bicycle pedal helmet derailleur peloton cyclist saddle handlebar sprocket spokes tandem velodrome"),
    ("photography", "camera lens aperture shutter tripod photographer exposure darkroom zoom flash negative viewfinder"),
    ("tennis", "racket serve volley backhand forehand tiebreak umpire baseline deuce wimbledon lob ace"),
    ("farming", "tractor harvest barn livestock plough wheat farmer irrigation pasture cattle silo hay"),
    ("theater", "actor stage playwright rehearsal audience curtain script backstage costume understudy matinee spotlight"),
    ("mathematics", "theorem equation integral matrix polynomial geometry calculus algebra proof fraction vector logarithm"),
    ("plumbing", "plumber faucet pipe drain valve leak wrench sewer gasket boiler toilet sink"),
    ("archaeology", "excavation artifact pottery fossil ruins tomb archaeologist relic dig inscription shard mummy"),
    ("cats", "kitten whiskers meow litter tabby purring catnip siamese scratching feline hairball tomcat"),
    ("skiing", "skier slope chairlift snowboard piste downhill moguls ski lodge slalom powder gondola"),
    ("wine", "vineyard merlot sommelier cork vintage chardonnay grapes cellar winery tannin riesling decanter"),
    ("genetics", "chromosome gene mutation genome dna heredity allele sequencing rna protein helix mitosis"),
    ("firefighting", "firefighter hose extinguisher blaze smoke ladder firetruck sprinkler hydrant rescue flames alarm"),
    ("carpentry", "carpenter lumber sawdust chisel hammer plank joinery workbench varnish sander timber dovetail"),
    ("spaceflight", "astronaut rocket spacecraft launchpad capsule spacewalk cosmonaut booster countdown lunar orbiter module"),
    ("basketball", "dunk hoop rebound dribbling layup backboard freethrow jumpshot courtside playoff buzzer nba"),
    ("libraries", "librarian bookshelf catalogue borrowing archive reading novel paperback bookmark encyclopedia manuscript index"),
    ("electricity", "voltage circuit battery transformer wiring resistor current capacitor fuse socket generator amperes"),
    ("horses", "stallion mare foal jockey stable gallop pony bridle hooves horseshoe trot equestrian"),
    ("diving", "scuba diver snorkel wetsuit flipper oxygen submerge shipwreck decompression mask regulator underwater"),
    ("pottery", "kiln clay ceramic potter glazing wheel vase porcelain earthenware stoneware jug terracotta"),
    ("trucking", "trucker lorry highway diesel trailer haulage cargo depot forklift pallet dispatcher convoy"),
    ("knitting", "yarn needles wool sweater scarf crochet stitch knitter cardigan mittens skein purl"),
    ("robotics", "robot actuator sensor servo gripper automation android drone microchip lidar manipulator cyborg"),
    ("cheese", "cheddar brie camembert parmesan gouda mozzarella dairy creamery rind curd feta roquefort"),
    ("hiking", "backpack trail trekking compass campsite tent hiker footpath canteen boots lantern waypoint"),
    ("swimming", "swimmer pool freestyle breaststroke lifeguard goggles lap springboard backstroke lane poolside swimsuit"),
    ("fraud", "scam phishing counterfeit fraudster forgery embezzlement swindle hacker identity chargeback skimmer laundering"),
    ("tea", "teapot kettle matcha oolong chamomile teacup steeping earlgrey infusion darjeeling teabag samovar"),
    ("earthquakes", "earthquake seismograph tremor aftershock fault richter epicenter tsunami tectonic quake rubble seismic"),
    ("poetry", "poet sonnet stanza verse rhyme haiku ballad limerick couplet poem metaphor elegy"),
    ("submarines", "submarine periscope torpedo sonar hull submariner ballast conning nuclear hatch depth naval"),
    ("bees", "beekeeper honey hive pollen beeswax nectar swarm honeycomb apiary sting bumblebee pollinate"),
    ("circus", "acrobat clown juggler trapeze ringmaster tightrope circus unicycle stilts bigtop sideshow performer"),
    ("dinosaurs", "dinosaur tyrannosaurus raptor jurassic triceratops paleontologist fossilized stegosaurus brontosaurus cretaceous velociraptor pterodactyl"),
]

QUERY_WORDS = 3
PASSAGE_WORDS = 3
"""Topic words per query and per passage (disjoint within a row)."""

# Few and short function words: words every row shares lift the similarity of random pairs.
QUERY_TEMPLATES = [
    "{a}, {b} and {c} for {d}",
    "{d}: {a}, {b}, {c}",
]
PASSAGE_TEMPLATES = [
    "{d}: {x}, {y}, {z}",
    "{x}, {y} and {z} ({d})",
]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "k", "r", "s", "l"]

# Bad-row kinds, in the order they are appended; each breaks one text rule.
BAD_ROW_KINDS = ["null passage", "empty query", "null query", "empty passage"]

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("query", pa.string()),
        pa.field("passage", pa.string()),
        pa.field("label", pa.int64()),
    ]
)


def cluster_words(label: int) -> list[str]:
    """The topic vocabulary of cluster ``label``."""
    return TOPICS[label][1].split()


def _details(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct details: pronounceable made-up names ("Dravik"), two syllables
    and a coda (54,150 possible), three syllables when many are needed. No number: digits
    every row shares made random pairs look alike to MiniLM (mean cosine 0.146 vs 0.118)."""
    syllables = 2 if count <= 20_000 else 3
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        onsets = rng.integers(len(_ONSETS), size=syllables)
        vowels = rng.integers(len(_VOWELS), size=syllables)
        name = "".join(_ONSETS[o] + _VOWELS[v] for o, v in zip(onsets, vowels, strict=True))
        name = (name + _CODAS[int(rng.integers(len(_CODAS)))]).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _pair(label: int, detail: str, rng: np.random.Generator) -> tuple[str, str]:
    """One row's (query, passage): disjoint topic words of ``label``, the same ``detail``."""
    words = cluster_words(label)
    for _ in range(100):
        pick = [words[i] for i in rng.permutation(len(words))[: QUERY_WORDS + PASSAGE_WORDS]]
        a, b, c = pick[:QUERY_WORDS]
        x, y, z = pick[QUERY_WORDS:]
        query = QUERY_TEMPLATES[int(rng.integers(len(QUERY_TEMPLATES)))].format(a=a, b=b, c=c, d=detail)
        passage = PASSAGE_TEMPLATES[int(rng.integers(len(PASSAGE_TEMPLATES)))].format(x=x, y=y, z=z, d=detail)
        if len(query) <= MAX_CHARS and len(passage) <= MAX_CHARS:
            return query, passage
    raise AssertionError(f"no short enough text for cluster {label}")  # vocabularies are short words


def _labels(count: int, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced cluster labels (sizes differ by at most one), shuffled."""
    return rng.permutation(np.arange(count, dtype=np.int64) % num_clusters)


def clustered_rows(
    num_rows: int, num_clusters: int, eval_rows: int = 0, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The good rows, ``(train, eval)``: dicts with id, query, passage, label. Both splits
    draw from the same clusters; no detail is used twice across them."""
    _check(num_rows, num_clusters, eval_rows)
    rng = np.random.default_rng(seed)
    details = _details(num_rows + eval_rows, rng)
    splits = []
    offset = 0
    for split, count in (("train", num_rows), ("eval", eval_rows)):
        rows = []
        for i, label in enumerate(_labels(count, num_clusters, rng).tolist()):
            query, passage = _pair(label, details[offset + i], rng)
            rows.append({"id": f"{split}-{i:06d}", "query": query, "passage": passage, "label": label})
        offset += count
        splits.append(rows)
    return splits[0], splits[1]


def _check(num_rows: int, num_clusters: int, eval_rows: int) -> None:
    if num_rows < 1:
        raise ValueError(f"num_rows must be at least 1, got {num_rows}")
    if not 1 <= num_clusters <= len(TOPICS):
        raise ValueError(f"num_clusters must be in [1, {len(TOPICS)}] (one topic vocabulary each), got {num_clusters}")
    if eval_rows < 0:
        raise ValueError(f"eval_rows must be >= 0, got {eval_rows}")


def _bad_row(index: int) -> dict[str, Any]:
    kind = BAD_ROW_KINDS[index % len(BAD_ROW_KINDS)]
    row: dict[str, Any] = {
        "id": f"bad-{index:04d}",
        "query": "telescope, comet and orbit for Broken",
        "passage": "Broken: galaxy, nebula, planet",
        "label": 0,
        "kind": kind,
    }
    if kind == "null passage":
        row["passage"] = None
    elif kind == "empty query":
        row["query"] = "  "
    elif kind == "null query":
        row["query"] = None
    elif kind == "empty passage":
        row["passage"] = ""
    return row


def write_clustered_corpus(
    out_dir: str | Path,
    *,
    num_rows: int = 8192,
    num_clusters: int = 64,
    eval_rows: int = 1024,
    num_shards: int = 4,
    seed: int = 0,
    bad_rows: int = 2,
) -> dict[str, Any]:
    """Write the clustered (query, passage) corpus as Parquet and say where it went.

    ``out_dir/train/part-*.parquet`` (``num_rows`` good rows over ``num_shards`` files,
    plus ``bad_rows`` broken ones spread over the shards) and
    ``out_dir/eval/part-00000.parquet`` (``eval_rows`` rows: same clusters, new details).
    Columns: ``id`` string, ``query`` string, ``passage`` string, ``label`` int64 (the
    cluster, 0..num_clusters-1). The same arguments always write the same files.

    Returns the file lists and directories, ``train_rows``/``eval_rows`` (good rows),
    ``bad_rows`` and ``bad_row_kinds`` (id -> what is broken), ``num_clusters``,
    ``cluster_names`` (index = label) and ``columns``.
    """
    _check(num_rows, num_clusters, eval_rows)
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if bad_rows < 0:
        raise ValueError(f"bad_rows must be >= 0, got {bad_rows}")
    train_rows, eval_rows_ = clustered_rows(num_rows, num_clusters, eval_rows, seed)

    out = Path(out_dir)
    shard_rows = [[train_rows[i] for i in chunk] for chunk in np.array_split(np.arange(len(train_rows)), num_shards)]
    bad = [_bad_row(i) for i in range(bad_rows)]
    for i, row in enumerate(bad):
        shard_rows[i % num_shards].append(row)
    return {
        **write_splits(out, shard_rows, eval_rows_, SCHEMA, SCHEMA, bad),
        "num_clusters": num_clusters,
        "cluster_names": [name for name, _ in TOPICS[:num_clusters]],
        "columns": {"id": "id", "query": "query", "passage": "passage", "label": "label"},
    }

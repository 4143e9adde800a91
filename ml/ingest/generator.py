"""Synthetic CRM generator: a realistic, deterministic shop history with its planted truth.

What it plants, and records in ``audit.*`` so later tests can check the models against it:

* **Behavioural segments** (4–8, default 6) with different purchase rates, spend, category tastes, churn,
  seasonality; one row per customer in ``audit.planted_customers``.
* **Buy-till-you-die timing** (BG/NBD): while alive a customer buys as a Poisson process with rate
  ``λ ~ Gamma`` (per segment) modulated by weekly and yearly seasonality; after every purchase she drops out
  with probability ``p ~ Beta``. New customers' first order is at signup. So future spend is predictable from
  the past, and ``is_alive_at_end`` is known.
* **Baskets**: ``1 + Poisson`` lines, categories from the customer's Dirichlet taste, products by Zipf
  popularity (tilted by the segment's price appetite); **bundles** of 2–3 products added together with a known
  probability, their support / confidence / lift measured on the generated baskets (``audit.planted_bundles``).
* **Cancellations and returns** (a later order with negative quantities of items bought earlier).
* **Web events** (view / cart / search sessions) for a share of customers, around their orders and browsing.
* **Dirty data at known rates** (``audit.planted_truth``, key ``dirt.*``): duplicate order lines and orders,
  orders without customer, malformed emails / genders / countries / birth dates, zero or negative prices,
  test accounts, orders dated after ``end_date``. Every count there is a count of raw rows as loaded.

Scale: customers are generated in fixed chunks of :data:`CHUNK_CUSTOMERS`, each from its own RNG
(``SeedSequence(seed).spawn``), so the output depends on the seed only, never on memory, and at most two
chunks are alive at once. Everything is vectorised numpy / Arrow; each chunk is encoded here and streamed by a
writer thread (so PostgreSQL parses one chunk while numpy builds and encodes the next) inside the one batch
transaction.

Continuation (``append_days``): days after ``end_date`` are simulated from each customer's state at the end of
the window (who is alive, purchases left before dropping out; BG/NBD is memoryless) and loaded one batch per
day, so the window's rows never change and a warehouse holding N days gets only day N+1's rows. Generating
the window and k days at once gives the same rows as generating the window and continuing it day by day.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import date, timedelta

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from ml.errors import CrmError
from ml.ingest.batch import Batch, LoadReport, column_types, load_atomically
from ml.warehouse import copy_in

# Bump when the generator's output for the same parameters changes: it is part of the content hash, so a
# new version loads as a new batch instead of being skipped as "already loaded".
GENERATOR_VERSION = 1
# Deterministic default for "the last day of history": never today, so a seed means the same data forever.
ANCHOR_END_DATE = date(2025, 12, 31)
# Fixed, not a parameter: the chunking decides which RNG draws which customer, so changing it would change
# the data. 50k customers ≈ 0.6M order lines ≈ 150 MB of numpy + Arrow per chunk.
CHUNK_CUSTOMERS = 50_000
# The tables a chunk (and the catalog before the first chunk) COPYs into.
_CHUNK_TABLES = ("raw.products", "raw.customers", "raw.orders", "raw.order_lines", "raw.web_events",
                 "audit.planted_customers")
SECONDS_PER_DAY = 86_400
# RNG stream keys of the continuation (appended days), far above any chunk's key (1 + chunk index).
SIGNUP_KEY, DAY_KEY = 1_000_000, 1_000_001


# ---------------------------------------------------------------------------------------------------------
# Parameters and the fixed world (segments, categories, names)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorParams:
    """Everything that decides the generated data. Same parameters → same rows, and a no-op reload."""

    customers: int = 5000
    days: int = 730
    seed: int = 42
    end_date: date | None = None  # None → ANCHOR_END_DATE
    n_segments: int = 6  # 4..8 behavioural segments (the first n of SEGMENTS)
    n_categories: int = 10  # 8..12 product categories
    n_products: int | None = None  # None → 20·√customers, clipped to 200..2000
    n_bundles: int = 8  # 5..10 planted product bundles
    pre_existing_share: float = 0.25  # customers who signed up before the window
    cancel_rate: float = 0.03  # purchase orders cancelled (never fulfilled)
    return_rate: float = 0.06  # completed orders with a later (partial) return
    web_events: bool = True
    web_customer_share: float = 0.6  # customers whose browsing is tracked
    # Dirty data, as rates of the entity they apply to.
    duplicate_line_rate: float = 0.004  # order lines delivered twice
    duplicate_order_rate: float = 0.003  # order headers delivered twice
    missing_customer_rate: float = 0.01  # orders whose customer_id the source lost
    bad_email_rate: float = 0.02  # customers with an email without '@'
    gender_variant_rate: float = 0.3  # genders spelled 'male', 'Female', 'f', '', ... instead of M / F / null
    bad_country_rate: float = 0.03  # countries in lowercase or with stray whitespace
    bad_birth_date_rate: float = 0.01  # birth dates 1900-01-01 or in the future
    missing_birth_date_rate: float = 0.1  # customers who never gave one (not dirt: a null)
    bad_price_rate: float = 0.001  # order lines with a zero or negative unit price
    test_account_rate: float = 0.005  # internal test customers (flag and/or @test.example email)
    future_order_rate: float = 0.002  # orders dated after end_date (clock errors)
    # Days simulated after end_date, each loaded as its own small batch on top of the window's batch: the
    # window's rows never change, so a warehouse holding the window gets only the new days' rows.
    append_days: int = 0

    @property
    def resolved_end_date(self) -> date:
        return self.end_date or ANCHOR_END_DATE

    @property
    def start_date(self) -> date:
        return self.resolved_end_date - timedelta(days=self.days - 1)

    @property
    def product_count(self) -> int:
        if self.n_products is not None:
            return self.n_products
        return int(np.clip(round(20 * np.sqrt(self.customers)), 200, 2000))

    def canonical(self) -> dict:
        """The parameters as plain JSON values, defaults resolved (``end_date=None`` ≡ the anchor date)."""
        values = asdict(self)
        del values["append_days"]  # not part of the window's content (nor of its batch's hash)
        values["end_date"] = self.resolved_end_date.isoformat()
        values["n_products"] = self.product_count
        return values

    def validate(self) -> None:
        problems = []
        if self.customers < 1:
            problems.append(f"customers must be ≥ 1 (got {self.customers})")
        if not 30 <= self.days <= 3650:
            problems.append(f"days must be between 30 and 3650 (got {self.days})")
        if not 4 <= self.n_segments <= len(SEGMENTS):
            problems.append(f"n_segments must be between 4 and {len(SEGMENTS)} (got {self.n_segments})")
        if not 8 <= self.n_categories <= len(CATEGORIES):
            problems.append(f"n_categories must be between 8 and {len(CATEGORIES)} (got {self.n_categories})")
        if not 0 <= self.append_days <= 366:
            problems.append(f"append_days must be between 0 and 366 (got {self.append_days})")
        if not 5 <= self.n_bundles <= 10:
            problems.append(f"n_bundles must be between 5 and 10 (got {self.n_bundles})")
        if self.product_count < 100:
            problems.append(f"n_products must be ≥ 100 (got {self.product_count})")
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name.endswith("_rate") or f.name.endswith("_share")) and not 0 <= value <= 1:
                problems.append(f"{f.name} must be a fraction in [0, 1] (got {value})")
        if problems:
            raise CrmError("invalid generator parameters: " + "; ".join(problems))


@dataclass(frozen=True)
class Segment:
    name: str
    share: float  # of customers (renormalised over the segments in use)
    orders_per_year: float  # mean of λ·365 while alive
    rate_shape: float  # gamma shape of λ: lower = more spread within the segment
    dropout_mean: float  # mean of p, the chance to churn after each purchase
    basket_mean: float  # mean lines per order
    quantity_mean: float  # mean units per line
    discount_share: float  # share of lines bought on a discount
    price_tilt: float  # product choice ∝ popularity · (price / category median)^tilt
    december_boost: float  # multiplies the yearly December peak
    taste_concentration: float  # how closely customers follow the segment's category taste
    web_affinity: float  # multiplies web_customer_share


# Ordered so that the first n (n = 4..8) are the most distinct behaviours.
SEGMENTS: tuple[Segment, ...] = (
    Segment("Loyal big spenders", 0.08, 10.0, 4.0, 0.03, 4.0, 2.0, 0.10, 0.3, 1.0, 30.0, 1.2),
    Segment("Regular shoppers", 0.17, 5.0, 3.0, 0.07, 3.0, 1.5, 0.15, 0.0, 1.0, 20.0, 1.0),
    Segment("Bargain hunters", 0.15, 4.5, 3.0, 0.12, 3.5, 2.0, 0.60, -0.8, 1.0, 15.0, 1.3),
    Segment("One-time buyers", 0.20, 0.8, 2.0, 0.70, 1.8, 1.2, 0.20, 0.0, 1.0, 10.0, 0.6),
    Segment("Seasonal gift buyers", 0.15, 1.5, 2.0, 0.15, 2.5, 1.3, 0.20, 0.3, 3.0, 10.0, 0.8),
    Segment("Occasional browsers", 0.25, 1.5, 2.0, 0.25, 2.0, 1.2, 0.15, 0.0, 1.0, 10.0, 1.1),
    Segment("Premium connoisseurs", 0.05, 3.0, 4.0, 0.05, 2.0, 1.1, 0.05, 1.2, 1.2, 40.0, 0.9),
    Segment("Fading regulars", 0.05, 7.0, 3.0, 0.30, 3.0, 1.5, 0.15, 0.0, 1.0, 20.0, 1.0),
)

# (category, median list price, {subcategory: nouns})
CATEGORIES: tuple[tuple[str, float, dict[str, tuple[str, ...]]], ...] = (
    ("Home & Kitchen", 25.0, {"Cookware": ("Frying Pan", "Saucepan", "Casserole Dish", "Wok"),
                              "Tableware": ("Mug", "Dinner Plate", "Serving Bowl", "Teapot"),
                              "Storage": ("Storage Jar", "Lunch Box", "Bread Bin", "Spice Rack")}),
    ("Electronics", 80.0, {"Audio": ("Headphones", "Bluetooth Speaker", "Earbuds", "Radio"),
                           "Accessories": ("Charging Cable", "Power Bank", "Phone Case", "Laptop Sleeve"),
                           "Smart Home": ("Smart Plug", "Light Bulb", "Doorbell Camera", "Thermostat")}),
    ("Fashion", 40.0, {"Tops": ("T-Shirt", "Sweater", "Blouse", "Hoodie"),
                       "Shoes": ("Sneakers", "Ankle Boots", "Sandals", "Loafers"),
                       "Bags": ("Tote Bag", "Backpack", "Wallet", "Crossbody Bag")}),
    ("Beauty", 20.0, {"Skincare": ("Face Cream", "Serum", "Cleanser", "Sunscreen"),
                      "Makeup": ("Lipstick", "Mascara", "Foundation", "Eyeshadow Palette"),
                      "Fragrance": ("Eau de Parfum", "Body Mist", "Scented Candle", "Perfume Oil")}),
    ("Sports & Outdoors", 45.0, {"Fitness": ("Yoga Mat", "Dumbbell Set", "Resistance Band", "Skipping Rope"),
                                 "Camping": ("Tent", "Sleeping Bag", "Camping Stove", "Head Torch"),
                                 "Cycling": ("Bike Light", "Cycling Helmet", "Bike Lock", "Water Bottle")}),
    ("Toys & Games", 22.0, {"Board Games": ("Strategy Game", "Card Game", "Party Game", "Chess Set"),
                            "Puzzles": ("Jigsaw Puzzle", "3D Puzzle", "Puzzle Box", "Brain Teaser"),
                            "Outdoor Toys": ("Kite", "Frisbee", "Water Gun", "Bubble Machine")}),
    ("Books", 14.0, {"Fiction": ("Crime Novel", "Fantasy Novel", "Short Stories", "Romance Novel"),
                     "Cookbooks": ("Baking Book", "Vegan Cookbook", "Italian Cookbook", "Grill Guide"),
                     "Children": ("Picture Book", "Activity Book", "Bedtime Stories", "Sticker Book")}),
    ("Grocery", 8.0, {"Coffee & Tea": ("Coffee Beans", "Green Tea", "Herbal Tea", "Espresso Pods"),
                      "Snacks": ("Chocolate Bar", "Trail Mix", "Crackers", "Fudge"),
                      "Pantry": ("Olive Oil", "Pasta Sauce", "Honey", "Granola")}),
    ("Garden", 30.0, {"Plants": ("Herb Kit", "Succulent", "Flower Bulbs", "Seed Collection"),
                      "Tools": ("Pruning Shears", "Trowel", "Watering Can", "Garden Gloves"),
                      "Decor": ("Solar Lantern", "Bird Feeder", "Plant Pot", "Wind Chime")}),
    ("Pet Supplies", 18.0, {"Dog": ("Dog Lead", "Chew Toy", "Dog Bed", "Dog Treats"),
                            "Cat": ("Scratching Post", "Cat Toy", "Cat Litter", "Cat Treats"),
                            "Aquarium": ("Fish Food", "Aquarium Filter", "Tank Light", "Aquarium Plant")}),
    ("Jewellery", 120.0, {"Rings": ("Ring", "Signet Ring", "Stacking Ring", "Band"),
                          "Necklaces": ("Pendant", "Chain Necklace", "Locket", "Choker"),
                          "Watches": ("Wristwatch", "Smartwatch Strap", "Pocket Watch", "Watch Box")}),
    ("Stationery", 9.0, {"Notebooks": ("Notebook", "Journal", "Planner", "Sketchbook"),
                         "Pens": ("Fountain Pen", "Gel Pen Set", "Highlighters", "Pencil Case"),
                         "Art Supplies": ("Watercolour Set", "Brush Set", "Acrylic Paints", "Canvas Pad")}),
)
ADJECTIVES = ("Classic", "Modern", "Vintage", "Deluxe", "Essential", "Compact", "Premium", "Rustic", "Nordic",
              "Eco", "Handmade", "Travel", "Everyday", "Signature", "Organic", "Bright", "Cosy", "Urban",
              "Retro", "Pro", "Mini", "Grand", "Soft", "Bold")
DESCRIPTORS = ("Oak", "Ceramic", "Cotton", "Steel", "Bamboo", "Linen", "Copper", "Velvet", "Glass", "Leather",
               "Marble", "Wool", "Blue", "Green", "Black", "White", "Rose", "Sage", "Charcoal", "Ivory")
BRANDS = ("Acorn & Co", "Northwind", "Bluebell", "Kestrel", "Juniper", "Halcyon", "Marlow", "Tidewater",
          "Foxglove", "Ironbark", "Sundial", "Lumen", "Oakridge", "Pebble", "Quill", "Rowan", "Saffron",
          "Thistle", "Umber", "Willow", "Yarrow", "Zephyr", "Alder", "Birch", "Cedar", "Driftwood", "Ember",
          "Fable", "Granite", "Harbor", "Indigo", "Jasper", "Kinfolk", "Larch", "Meadow", "Nimbus")
FIRST_NAMES = ("Olivia", "Amelia", "Isla", "Ava", "Mia", "Sophia", "Grace", "Lily", "Freya", "Emily", "Anna",
               "Laura", "Sarah", "Emma", "Julia", "Lea", "Marie", "Chloe", "Camille", "Lucia", "Noah", "Oliver",
               "George", "Leo", "Arthur", "Jack", "Harry", "Oscar", "Lucas", "Thomas", "James", "David", "Daniel",
               "Paul", "Max", "Felix", "Hugo", "Louis", "Mateo", "Luca")
FEMALE_FIRST_NAMES = 20  # the first 20 FIRST_NAMES are female, the rest male
LAST_NAMES = ("Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel", "Wright",
              "Walker", "Evans", "Green", "Hall", "Wood", "Clarke", "Müller", "Schmidt", "Schneider", "Fischer",
              "Weber", "Martin", "Bernard", "Dubois", "Durand", "Leroy", "Rossi", "Russo", "Ferrari", "García",
              "Fernández", "López", "Murphy", "Kelly", "O'Brien", "Jansen", "de Vries", "Nowak", "Novak", "Berg")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example", "inbox.example")
TEST_EMAIL_DOMAIN = "test.example"
# (country, city, weight)
PLACES = (
    ("United Kingdom", "London", 14), ("United Kingdom", "Manchester", 5), ("United Kingdom", "Leeds", 3),
    ("United Kingdom", "Bristol", 3), ("United Kingdom", "Glasgow", 3), ("Germany", "Berlin", 5),
    ("Germany", "Munich", 3), ("Germany", "Hamburg", 3), ("France", "Paris", 5), ("France", "Lyon", 2),
    ("Netherlands", "Amsterdam", 3), ("Netherlands", "Utrecht", 1), ("Ireland", "Dublin", 3),
    ("Spain", "Madrid", 3), ("Spain", "Barcelona", 2), ("Italy", "Milan", 2), ("Italy", "Rome", 2),
    ("Belgium", "Brussels", 2), ("Sweden", "Stockholm", 2), ("Poland", "Warsaw", 2),
)
ACQUISITION_CHANNELS = (("organic", 0.30), ("paid_search", 0.22), ("social", 0.18), ("email", 0.10),
                        ("referral", 0.12), ("affiliate", 0.08))
ORDER_CHANNELS = (("web", 0.55), ("app", 0.25), ("store", 0.15), ("phone", 0.05))
STATUSES = ("completed", "cancelled", "returned")
COMPLETED, CANCELLED, RETURNED = 0, 1, 2
DISCOUNT_LEVELS = np.array([0.1, 0.15, 0.2, 0.25, 0.3, 0.5])
WEEKDAY_FACTORS = np.array([0.92, 0.95, 0.97, 1.0, 1.08, 1.18, 0.90])  # Monday..Sunday
# Share of orders per hour of the day: quiet at night, lunch and evening peaks.
HOUR_WEIGHTS = np.array([1.2, 0.7, 0.4, 0.3, 0.3, 0.5, 1.2, 2.5, 3.8, 4.6, 5.2, 5.6,
                         6.2, 6.0, 5.4, 5.1, 5.0, 5.3, 5.9, 6.6, 7.0, 6.3, 4.5, 2.6])
# Raw spellings of gender as different source systems deliver them.
GENDER_CANONICAL = {"M": "M", "F": "F", "U": None}
GENDER_VARIANTS = {"M": ("male", "Male", "m", "MALE"), "F": ("female", "Female", "f", "FEMALE"),
                   "U": ("", "unknown", "U", "n/a")}


# ---------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------
def generate(
    conn: psycopg.Connection,
    params: GeneratorParams,
    *,
    timings: dict[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    reports: list[LoadReport] | None = None,
) -> LoadReport:
    """Generate a CRM into the raw layer as one atomic, idempotent load batch, with its planted truth.

    ``timings`` (optional) receives seconds spent generating (numpy/Arrow, ``generate``), encoding the COPY
    payloads (``encode``), waiting for the COPY thread (``wait_copy``) and streaming each table
    (``copy <table>``, in the writer thread, overlapping the generation);
    ``progress(done_customers, customers)`` is called after each chunk.

    With ``append_days = k`` the window's batch is followed by one batch per day after ``end_date`` (a
    batch already loaded is skipped, as always), and the report of the last day's batch is returned: on a
    warehouse that already holds the window (or its first days), only the missing days are generated.
    ``reports`` (optional) receives every batch's report, the window's first.
    """
    params.validate()
    canonical = params.canonical()
    hashed = json.dumps({"generator_version": GENERATOR_VERSION, **canonical}, sort_keys=True)
    # The four CLI knobs always, any other parameter only when it differs from its default.
    defaults = asdict(GeneratorParams())
    extra = [f"{f.name}={getattr(params, f.name)}" for f in fields(params)
             if f.name not in ("customers", "days", "seed", "end_date", "append_days")
             and getattr(params, f.name) != defaults[f.name]]
    source_name = " ".join(
        [f"customers={params.customers}", f"days={params.days}", f"seed={params.seed}",
         f"end_date={canonical['end_date']}", *extra]
    )

    def fill(batch: Batch) -> None:
        _Generation(batch, params, timings, progress).run()

    report = load_atomically(
        conn,
        source="generator",
        source_name=source_name,
        content_sha256=hashlib.sha256(hashed.encode()).hexdigest(),
        primary_table="raw.order_lines",
        fill=fill,
    )
    reports = reports if reports is not None else []
    reports.append(report)
    family = [report.batch_id or report.already_loaded_as]  # the batches this continuation builds on
    for day in range(1, params.append_days + 1):
        date_of_day = params.resolved_end_date + timedelta(days=day)

        def fill_day(batch: Batch, day: int = day) -> None:
            _Generation(batch, params, timings, None).run_day(day, family)

        report = load_atomically(
            conn,
            source="generator",
            source_name=f"{source_name} append_day={day} ({date_of_day.isoformat()})",
            content_sha256=hashlib.sha256(f"{hashed} append_day={day}".encode()).hexdigest(),
            primary_table="raw.order_lines",
            fill=fill_day,
        )
        reports.append(report)
        family.append(report.batch_id or report.already_loaded_as)
    return report


# ---------------------------------------------------------------------------------------------------------
# The world shared by all chunks: calendar, catalog, segments, bundles
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _World:
    segments: tuple[Segment, ...]
    seg_share: np.ndarray
    seg_taste: np.ndarray  # (S, K) mean category taste per segment
    cum_intensity: np.ndarray  # (S, days + 1) cumulative seasonal intensity, mean daily intensity 1
    intensity: np.ndarray  # (S, days)
    intensity_norm: np.ndarray  # (S, 1) the window's mean raw intensity (divides appended days' too)
    start_ts: int  # epoch seconds of start_date 00:00
    end_ts: int  # epoch seconds of end_date + 1 day (exclusive)
    # catalog, sorted by category
    product_ids: pa.Array
    product_category: np.ndarray
    product_price: np.ndarray
    cat_start: np.ndarray  # (K + 1) first product of each category
    choice_cum: np.ndarray  # (S · P) key s·K + category + within-category cumulative choice probability
    cat_mean_price: np.ndarray  # (S, K) expected list price of a line in category k for segment s
    products_table: pa.Table
    bundles: np.ndarray  # (B, 3) product indices, -1 padded
    bundle_add_prob: np.ndarray
    bundle_of_first: np.ndarray  # (P) bundle whose first item the product is, or -1


def _seasonal_intensity(segments, start: date, day_index: np.ndarray) -> np.ndarray:
    """(S, days) un-normalised purchase intensity: weekday × yearly seasonality with a December peak and a
    Black-Friday bump. ``day_index`` counts from ``start`` and may run past the window (appended days)."""
    dates = np.datetime64(start.isoformat(), "D") + day_index
    weekday = (dates.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday → Monday = 0
    doy = (dates - dates.astype("datetime64[Y]")).astype(np.int64)  # 0-based day of year
    yearly = 1 + 0.12 * np.cos(2 * np.pi * (doy - 200) / 365.25)  # summer a little busier than late winter
    december = 0.9 * np.exp(-0.5 * ((doy - 345) / 9.0) ** 2) + 0.5 * np.exp(-0.5 * ((doy - 331) / 2.5) ** 2)
    boost = np.array([s.december_boost for s in segments])[:, None]
    return WEEKDAY_FACTORS[weekday][None, :] * (yearly[None, :] + boost * december[None, :])


def _build_world(params: GeneratorParams, rng: np.random.Generator) -> _World:
    segments = SEGMENTS[: params.n_segments]
    share = np.array([s.share for s in segments])
    share = share / share.sum()
    K = params.n_categories
    cats = CATEGORIES[:K]
    seg_taste = rng.dirichlet(np.full(K, 0.7), size=len(segments))

    # Calendar: weekday × yearly seasonality, normalised to a mean daily intensity of 1 over the window
    # (appended days keep the window's normaliser, so their intensity continues the same curve).
    raw_intensity = _seasonal_intensity(segments, params.start_date, np.arange(params.days))
    intensity_norm = raw_intensity.mean(axis=1, keepdims=True)
    intensity = raw_intensity / intensity_norm
    cum = np.concatenate([np.zeros((len(segments), 1)), np.cumsum(intensity, axis=1)], axis=1)

    # Catalog: category sizes ∝ Dirichlet, Zipf popularity over the whole catalog.
    P = params.product_count
    sizes = np.maximum(rng.multinomial(P - 5 * K, rng.dirichlet(np.full(K, 4.0))), 0) + 5
    category = np.repeat(np.arange(K), sizes)
    cat_start = np.concatenate([[0], np.cumsum(sizes)])
    median = np.array([c[1] for c in cats])
    price = np.exp(rng.normal(np.log(median[category]), 0.55))
    price = np.maximum(np.floor(price) + 0.99, 0.99).round(2)
    popularity = 1.0 / (rng.permutation(P) + 1.0) ** 1.05

    sub_names = np.array([sub for c in cats for sub in c[2]], dtype=object)
    nouns = np.array([n for c in cats for sub in c[2].values() for n in sub], dtype=object)
    n_sub = np.array([len(c[2]) for c in cats])
    sub_offset = np.concatenate([[0], np.cumsum(n_sub)])
    subcat = sub_offset[category] + rng.integers(0, n_sub[category])
    noun = subcat * 4 + rng.integers(0, 4, P)
    adjective = np.array(ADJECTIVES, dtype=object)[rng.integers(0, len(ADJECTIVES), P)]
    descriptor = np.array(DESCRIPTORS, dtype=object)[rng.integers(0, len(DESCRIPTORS), P)]
    brands_per_cat = rng.choice(len(BRANDS), size=(K, 6), replace=True)
    brand = np.array(BRANDS, dtype=object)[brands_per_cat[category, rng.integers(0, 6, P)]]
    names = adjective + " " + descriptor + " " + nouns[noun]
    cat_code = np.array([c[0][:3].upper() for c in cats], dtype=object)[category]
    sub_code = np.array([s.replace(" ", "")[:3].upper() for s in sub_names], dtype=object)[subcat]
    number = np.arange(1, P + 1)
    product_ids = _ids("P", number, max(5, len(str(P))))
    sku = cat_code + "-" + sub_code + "-" + _ids("", number * 7919 % 100_000, 5).to_numpy(zero_copy_only=False)
    products_table = pa.table({
        "product_id": product_ids,
        "sku": pa.array(sku.tolist(), pa.string()),
        "product_name": pa.array(names.tolist(), pa.string()),
        "category": pa.array([cats[k][0] for k in range(K)], pa.string()).take(pa.array(category)),
        "subcategory": pa.array(sub_names.tolist(), pa.string()).take(pa.array(subcat)),
        "brand": pa.array(brand.tolist(), pa.string()),
        "list_price": pa.array(price, pa.float64()),
    })

    # Per segment: choice probability within a category ∝ popularity · relative price^tilt.
    rel_price = price / median[category]
    tilt = np.array([s.price_tilt for s in segments])[:, None]
    weight = popularity[None, :] * rel_price[None, :] ** tilt  # (S, P)
    cat_total = np.add.reduceat(weight, cat_start[:-1], axis=1)  # (S, K)
    within = weight / cat_total[:, category]
    cum_within = np.empty_like(within)
    for k in range(K):  # K ≤ 12 categories
        lo, hi = cat_start[k], cat_start[k + 1]
        cum_within[:, lo:hi] = np.cumsum(within[:, lo:hi], axis=1)
        cum_within[:, hi - 1] = 1.0
    seg_index = np.arange(len(segments))[:, None]
    choice_cum = (seg_index * K + category[None, :] + cum_within).ravel()
    cat_mean_price = np.add.reduceat(within * price[None, :], cat_start[:-1], axis=1)

    # Bundles: a moderately popular first item (so baskets hold it often enough) and 1–2 less popular
    # companions (so the rule's lift is clearly above 1).
    rank = np.argsort(np.argsort(-popularity))
    first_pool = np.flatnonzero((rank >= max(2, P // 50)) & (rank < max(30, P // 5)))
    rest_pool = np.flatnonzero((rank >= P // 5) & (rank < (4 * P) // 5))
    B = params.n_bundles
    firsts = rng.choice(first_pool, size=B, replace=False)
    sizes_b = rng.integers(2, 4, B)
    rest = rng.choice(np.setdiff1d(rest_pool, firsts), size=(B, 2), replace=False)
    bundles = np.column_stack([firsts, rest[:, 0], np.where(sizes_b == 3, rest[:, 1], -1)])
    add_prob = rng.uniform(0.35, 0.7, B).round(3)
    bundle_of_first = np.full(P, -1)
    bundle_of_first[firsts] = np.arange(B)

    start_ts = _epoch(params.start_date)
    return _World(
        segments=segments, seg_share=share, seg_taste=seg_taste, cum_intensity=cum, intensity=intensity,
        intensity_norm=intensity_norm,
        start_ts=start_ts, end_ts=_epoch(params.resolved_end_date) + SECONDS_PER_DAY,
        product_ids=product_ids, product_category=category, product_price=price, cat_start=cat_start,
        choice_cum=choice_cum, cat_mean_price=cat_mean_price, products_table=products_table,
        bundles=bundles, bundle_add_prob=add_prob, bundle_of_first=bundle_of_first,
    )


@dataclass
class _Cohort:
    """Customers drawn together (one chunk, or one appended day's signups): per-customer arrays."""

    n: int
    seg: np.ndarray = None
    lam: np.ndarray = None  # purchases per day while alive
    dropout: np.ndarray = None  # p: chance to drop out after each purchase
    basket_extra: np.ndarray = None
    qty_extra: np.ndarray = None
    taste: np.ndarray = None  # (n, K)
    pre_existing: np.ndarray = None
    signup_day: np.ndarray = None  # day index from start_date (negative: signed up before the window)
    signup_sec: np.ndarray = None
    start_day: np.ndarray = None
    w_start: np.ndarray = None
    w_end: np.ndarray = None
    n_events: np.ndarray = None
    dies_at: np.ndarray = None
    total: np.ndarray = None  # purchases in the window, the first at signup included
    alive: np.ndarray = None  # alive at the end of the window
    keep: np.ndarray = None


# ---------------------------------------------------------------------------------------------------------
# One generation run: chunks of customers, pipelined COPY, truth at the end
# ---------------------------------------------------------------------------------------------------------
class _Generation:
    def __init__(self, batch: Batch, params: GeneratorParams, timings, progress):
        self.batch = batch
        self.params = params
        self.timings = timings if timings is not None else {}
        self.progress = progress
        self.dirt: dict[str, int] = {}
        self.bundle_counts = None  # (B, 4): baskets with first, with rest, with all; plus total baskets
        self.n_baskets = 0
        self.n_orders = 0
        self.n_sessions = 0
        self.lines_generated = 0
        self.segment_counts = np.zeros(params.n_segments, dtype=np.int64)
        self.alive_counts = np.zeros(params.n_segments, dtype=np.int64)
        self.gender_counts: dict[str, int] = {}
        self.pending: list[Future] = []

    # -- COPY in a writer thread: PostgreSQL parses chunk i while this thread builds and encodes chunk i+1 ---
    # The writer only streams bytes that are ready: encoding (CSV / binary) happens here, in the producer,
    # so the one server backend never idles while a payload is being encoded (at 1M the writer used to
    # encode then stream: the server sat idle for the encoding, ~half the client's CPU).
    def _submit(self, jobs: list[tuple[str, pa.Table, bool]]) -> None:
        started, cpu = time.perf_counter(), time.thread_time()
        payloads = []
        for table, frame, stamp in jobs:
            # Binary where it pays (web events, orders: text ids and timestamps): the one server backend
            # parsing the batch bounds the loader, and binary cuts its CPU for those tables by ~30 % (700k web
            # events: 0.53 -> 0.36 s). Order lines go binary too (prices and discounts are exact numeric(p,s)
            # fields): that saves the client's CSV writer, not the server's CPU (1M A/B: 36.2 / 36.8 s).
            # Customers (free text) stay CSV: encode_copy decides. Planted truth (stamp False) is binary too.
            payloads.append(self.batch.encode(table, frame, self.types[table], stamp=stamp))
        del jobs
        self._add_time("encode", started)
        # CPU of this thread encoding: the client work the writer (and so the server) no longer waits for
        self.timings["encode_cpu"] = self.timings.get("encode_cpu", 0.0) + time.thread_time() - cpu
        while len(self.pending) >= 1:  # at most one chunk queued behind the one being built: bounded memory
            started = time.perf_counter()
            self.pending.pop(0).result()
            self._add_time("wait_copy", started)
        self.pending.append(self.executor.submit(self._send_all, payloads))

    def _send_all(self, payloads: list) -> None:
        for payload in payloads:
            started = time.perf_counter()
            self.batch.send(payload)
            self._add_time(f"copy {payload.table}", started)

    def _add_time(self, key: str, started: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started

    def _set_world(self) -> _World:
        seeds = np.random.SeedSequence(self.params.seed).spawn(1)
        self.world = _build_world(self.params, np.random.default_rng(seeds[0]))
        # Per-segment attributes as arrays, indexed by each customer's segment.
        self.seg_attr = {f.name: np.array([getattr(s, f.name) for s in self.world.segments])
                         for f in fields(Segment) if f.name != "name"}
        return self.world

    def run(self) -> None:
        params = self.params
        started = time.perf_counter()
        world = self._set_world()
        self._add_time("generate", started)
        n_chunks = -(-params.customers // CHUNK_CUSTOMERS)
        # Column types up front: the producer encodes without touching the connection the writer streams on.
        self.types = column_types(self.batch.conn, list(_CHUNK_TABLES))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm-copy") as executor:
            self.executor = executor
            try:
                self._submit([("raw.products", world.products_table, True)])
                for index in range(n_chunks):
                    started = time.perf_counter()
                    # spawn_key (1 + index,): the same child for this chunk whatever the total number of chunks
                    seq = np.random.SeedSequence(params.seed, spawn_key=(1 + index,))
                    first = index * CHUNK_CUSTOMERS
                    count = min(CHUNK_CUSTOMERS, params.customers - first)
                    jobs = self._chunk(np.random.default_rng(seq), first, count)
                    self._add_time("generate", started)
                    self._submit(jobs)
                    if self.progress:
                        self.progress(first + count, params.customers)
                started = time.perf_counter()
                while self.pending:
                    self.pending.pop(0).result()
                self._add_time("wait_copy", started)
            finally:
                for future in self.pending:  # an error above: let the writer finish before the rollback
                    future.exception()
        # Counted as generated, so the batch's reconciliation checks that COPY really loaded every line.
        self.batch.report.lines_read = self.lines_generated
        self._record_truth()

    # -- one chunk of customers ----------------------------------------------------------------------------
    def _chunk(self, rng: np.random.Generator, first: int, n: int) -> list[tuple[str, pa.Table, bool]]:
        p, w = self.params, self.world
        # The draws below happen in a fixed order on the chunk's RNG; the continuation (run_day) replays
        # the first two to recover every customer's state at the end of the window.
        c = self._draw_traits(rng, n)
        self._draw_window_timing(rng, c)
        order_cust, order_ts = self._window_purchases(rng, c)
        customer_ids = _ids("C", first + 1 + np.arange(n), self._id_width("C"))
        orders, lines, order_channel, line_order, line_product = self._orders_and_lines(
            rng, c, order_cust, order_ts, customer_ids, w.end_ts)

        customers, is_test = self._customers(rng, n, customer_ids, c.seg, c.signup_day, c.signup_sec)
        jobs = [("raw.customers", customers, True), ("raw.orders", orders, True), ("raw.order_lines", lines, True)]
        if p.web_events:
            web_share = (p.web_customer_share * self.seg_attr["web_affinity"][c.seg]).clip(0, 1)
            tracked = rng.random(n) < web_share
            jobs.append(("raw.web_events", self._web_events(
                rng, tracked, customer_ids, c.seg, c.taste, c.start_day, order_cust, order_ts, order_channel,
                line_order, line_product), True))
        jobs.append(("audit.planted_customers", self._planted(c, customer_ids, c.alive), False))
        self.segment_counts += np.bincount(c.seg, minlength=len(w.segments))
        self.alive_counts += np.bincount(c.seg[c.alive], minlength=len(w.segments))
        self._count("test_account_customers", int(is_test.sum()))
        return jobs

    def _draw_traits(self, rng: np.random.Generator, n: int) -> _Cohort:
        """Segment, BTYD parameters, spend and category taste of ``n`` customers."""
        w, a = self.world, self.seg_attr
        c = _Cohort(n=n)
        c.seg = seg = rng.choice(len(w.segments), size=n, p=w.seg_share)
        shape = a["rate_shape"][seg]
        c.lam = rng.gamma(shape, a["orders_per_year"][seg] / 365.0 / shape)  # purchases per day
        kappa = 12.0
        p_mean = a["dropout_mean"][seg]
        c.dropout = rng.beta(p_mean * kappa, (1 - p_mean) * kappa).clip(1e-4, 0.999)
        spend = rng.lognormal(-0.5 * 0.35**2, 0.35, n)
        c.basket_extra = (a["basket_mean"][seg] - 1) * np.sqrt(spend)
        c.qty_extra = (a["quantity_mean"][seg] - 1) * spend
        taste = rng.gamma(a["taste_concentration"][seg][:, None] * w.seg_taste[seg] + 1e-3)
        c.taste = taste / taste.sum(axis=1, keepdims=True)
        return c

    def _draw_window_timing(self, rng: np.random.Generator, c: _Cohort) -> None:
        """Signup, purchases in the window and drop-out: Poisson while alive, geometric drop-out (BG/NBD)."""
        p, w, n = self.params, self.world, c.n
        days = p.days
        c.pre_existing = pre_existing = rng.random(n) < p.pre_existing_share
        c.signup_day = np.where(pre_existing, -rng.integers(1, 1500, n), rng.integers(0, days, n))
        c.signup_sec = _time_of_day(rng.random(n)).clip(0, 23 * 3600)
        c.start_day = start_day = np.maximum(c.signup_day, 0)
        frac = np.where(pre_existing, 0.0, c.signup_sec / SECONDS_PER_DAY)
        c.w_start = w.cum_intensity[c.seg, start_day] + frac * w.intensity[c.seg, np.minimum(start_day, days - 1)]
        c.w_end = w.cum_intensity[c.seg, days]
        c.n_events = rng.poisson(c.lam * (c.w_end - c.w_start))
        c.dies_at = rng.geometric(c.dropout)  # the purchase after which the customer drops out
        forced = (~pre_existing).astype(np.int64)  # new customers' first order is at signup
        c.total = np.minimum(c.dies_at, forced + c.n_events)
        c.alive = c.dies_at > forced + c.n_events
        c.keep = c.total - forced  # repeat purchases kept, the earliest ones

    def _window_purchases(self, rng: np.random.Generator, c: _Cohort) -> tuple[np.ndarray, np.ndarray]:
        """Every purchase of the window as (customer, epoch seconds), ordered by customer then time."""
        w = self.world
        cust_of_event = np.repeat(np.arange(c.n), c.n_events)
        u = np.sort(cust_of_event + rng.random(cust_of_event.size) * 0.999999) - cust_of_event
        rank = np.arange(cust_of_event.size) - np.repeat(np.cumsum(c.n_events) - c.n_events, c.n_events)
        kept = rank < c.keep[cust_of_event]
        cust_rep = cust_of_event[kept]
        target = c.w_start[cust_rep] + u[kept] * (c.w_end[cust_rep] - c.w_start[cust_rep])
        day_rep, frac_rep = _inverse_intensity(w.cum_intensity, w.intensity, c.seg[cust_rep], target)
        new = np.flatnonzero(~c.pre_existing)
        order_cust = np.concatenate([new, cust_rep])
        order_day = np.concatenate([c.signup_day[new], day_rep])
        order_sec = np.concatenate([c.signup_sec[new] + rng.integers(60, 3000, new.size), _time_of_day(frac_rep)])
        order_ts = w.start_ts + order_day.astype(np.int64) * SECONDS_PER_DAY + order_sec
        by_time = np.argsort(_sort_key(order_cust, order_ts - w.start_ts))
        return order_cust[by_time], order_ts[by_time]

    def _orders_and_lines(self, rng, c: _Cohort, order_cust, order_ts, customer_ids, end_ts):
        """Baskets, bundles, returns and order-level dirt for the given purchases: the orders and order lines
        tables, plus what the web events need (channel per purchase, line → purchase, line → product)."""
        p, w, a = self.params, self.world, self.seg_attr
        seg, taste = c.seg, c.taste
        n_orders = order_cust.size

        # Baskets: lines per order, category by taste, product by segment-tilted popularity.
        order_status = np.where(rng.random(n_orders) < p.cancel_rate, CANCELLED, COMPLETED).astype(np.int8)
        n_lines = 1 + rng.poisson(c.basket_extra[order_cust])
        line_order = np.repeat(np.arange(n_orders), n_lines)
        line_cust = order_cust[line_order]
        line_product = self._pick_products(rng, seg[line_cust], taste, line_cust)

        # Bundles: a basket holding a bundle's first item gets its companions with add_prob.
        b = w.bundle_of_first[line_product]
        hit = np.flatnonzero(b >= 0)
        hit = hit[rng.random(hit.size) < w.bundle_add_prob[b[hit]]]
        companions = w.bundles[b[hit], 1:]
        extra_order = np.repeat(line_order[hit], 2)[companions.ravel() >= 0]
        extra_product = companions.ravel()[companions.ravel() >= 0]
        line_order = np.concatenate([line_order, extra_order])
        line_product = np.concatenate([line_product, extra_product])
        regroup = np.argsort(line_order, kind="stable")
        line_order, line_product = line_order[regroup], line_product[regroup]
        line_cust = order_cust[line_order]
        n_purchase_lines = line_order.size
        line_qty = 1 + rng.poisson(c.qty_extra[line_cust])
        discounted = rng.random(n_purchase_lines) < a["discount_share"][seg[line_cust]]
        line_discount = np.where(discounted, DISCOUNT_LEVELS[rng.integers(0, DISCOUNT_LEVELS.size,
                                                                          n_purchase_lines)], 0.0)
        line_price = w.product_price[line_product].copy()
        self._measure_bundles(line_order, line_product, order_status == COMPLETED, n_orders)

        # Returns: a later order with negative quantities of some of the items of a completed order.
        returned = np.flatnonzero((order_status == COMPLETED) & (rng.random(n_orders) < p.return_rate))
        return_ts = order_ts[returned] + rng.integers(1, 30, returned.size) * SECONDS_PER_DAY \
            + rng.integers(-3 * 3600, 3 * 3600, returned.size)
        in_window = return_ts < end_ts
        returned, return_ts = returned[in_window], return_ts[in_window]
        return_no = np.full(n_orders, -1)
        return_no[returned] = np.arange(returned.size)
        line_start = np.searchsorted(line_order, np.arange(n_orders))
        line_count = np.diff(np.append(line_start, n_purchase_lines))
        rank_in_order = np.arange(n_purchase_lines) - line_start[line_order]
        sure = np.floor(rng.random(n_orders) * line_count).astype(np.int64)  # ≥ 1 line per return
        r_line = np.flatnonzero((return_no[line_order] >= 0)
                                & ((rank_in_order == sure[line_order]) | (rng.random(n_purchase_lines) < 0.35)))

        # All orders: purchases then returns; global numbering continues across chunks.
        n_returns = returned.size
        all_cust = np.concatenate([order_cust, order_cust[returned]])
        all_ts = np.concatenate([order_ts, return_ts])
        status = np.concatenate([order_status, np.full(n_returns, RETURNED, np.int8)])
        channel_p = np.array([ch[1] for ch in ORDER_CHANNELS])
        order_channel = rng.choice(len(ORDER_CHANNELS), size=n_orders, p=channel_p)
        all_channel = np.concatenate([order_channel, order_channel[returned]])
        all_lines_order = np.concatenate([line_order, n_orders + return_no[line_order[r_line]]])
        all_product = np.concatenate([line_product, line_product[r_line]])
        all_qty = np.concatenate([line_qty, -line_qty[r_line]])
        all_price = np.concatenate([line_price, line_price[r_line]])
        all_discount = np.concatenate([line_discount, line_discount[r_line]])
        order_number = self.n_orders + 1 + np.arange(n_orders + n_returns)
        self.n_orders += n_orders + n_returns

        # Dirt on orders: missing customer, future timestamps. Only on purchases that were never returned, so
        # every return still follows a purchase of the same items by the same customer.
        n_all = all_cust.size
        never_returned = np.concatenate([return_no < 0, np.zeros(n_returns, bool)])
        has_customer = ~never_returned | (rng.random(n_all) >= p.missing_customer_rate)
        future = never_returned & (rng.random(n_all) < p.future_order_rate)
        all_ts = np.where(future, end_ts + rng.integers(0, 365 * SECONDS_PER_DAY, n_all), all_ts)
        # Dirt on lines: zero or negative unit prices.
        bad_price = rng.random(all_product.size) < p.bad_price_rate
        all_price = np.where(bad_price, np.where(rng.random(all_product.size) < 0.5, 0.0, -all_price), all_price)
        # Line numbers within each order (purchase lines are grouped; return lines keep their order too).
        order_of_line = all_lines_order
        line_group = np.argsort(order_of_line, kind="stable")
        first_of = np.searchsorted(order_of_line[line_group], order_of_line[line_group])
        line_no = np.empty(order_of_line.size, np.int64)
        line_no[line_group] = np.arange(order_of_line.size) - first_of + 1

        # Exact duplicates of order headers and order lines, appended as a second delivery would be.
        dup_orders = np.flatnonzero(rng.random(n_all) < p.duplicate_order_rate)
        dup_lines = np.flatnonzero(rng.random(order_of_line.size) < p.duplicate_line_rate)
        o_rows = np.concatenate([np.arange(n_all), dup_orders])
        l_rows = np.concatenate([np.arange(order_of_line.size), dup_lines])

        order_ids = _ids("O", order_number, self._id_width("O"))
        orders = pa.table({
            "order_id": order_ids.take(pa.array(o_rows)),
            "customer_id": pc.if_else(pa.array(has_customer[o_rows]), customer_ids.take(pa.array(all_cust[o_rows])),
                                      pa.scalar(None, pa.string())),
            "ordered_at": pa.array(all_ts[o_rows], pa.timestamp("s")),
            "status": pa.array(STATUSES).take(pa.array(status[o_rows])),
            "channel": pa.array([ch[0] for ch in ORDER_CHANNELS]).take(pa.array(all_channel[o_rows])),
        })
        lines = pa.table({
            "order_id": order_ids.take(pa.array(order_of_line[l_rows])),
            "line_no": pa.array(line_no[l_rows], pa.int32()),
            "product_id": w.product_ids.take(pa.array(all_product[l_rows])),
            "quantity": pa.array(all_qty[l_rows], pa.int32()),
            "unit_price": pa.array(all_price[l_rows].round(2), pa.float64()),
            "discount": pa.array(all_discount[l_rows], pa.float64()),
        })
        self.lines_generated += lines.num_rows
        self._count("duplicate_order_lines", dup_lines.size)
        self._count("duplicate_orders", dup_orders.size)
        self._count("orders_missing_customer", int((~has_customer[o_rows]).sum()))
        self._count("future_orders", int(future[o_rows].sum()))
        self._count("bad_unit_price_lines", int(bad_price[l_rows].sum()))
        self._count("cancelled_orders", int((status[o_rows] == CANCELLED).sum()))
        self._count("return_orders", int((status[o_rows] == RETURNED).sum()))
        return orders, lines, order_channel, line_order, line_product

    def _planted(self, c: _Cohort, customer_ids: pa.Array, alive: np.ndarray) -> pa.Table:
        """Planted truth per customer. mean_order_value = E[lines]·E[units]·E[price | taste]·(1 − E[discount]),
        before bundle add-ons, cancellations and returns."""
        w = self.world
        exp_price = (c.taste * w.cat_mean_price[c.seg]).sum(axis=1)
        mean_order_value = (1 + c.basket_extra) * (1 + c.qty_extra) * exp_price \
            * (1 - self.seg_attr["discount_share"][c.seg] * DISCOUNT_LEVELS.mean())
        names = pa.array([s.name for s in w.segments], pa.string())
        return pa.table({
            "batch_id": pa.array(np.full(c.n, self.batch.batch_id), pa.int64()),
            "customer_id": customer_ids,
            "segment": names.take(pa.array(c.seg)),
            "purchase_rate": pa.array(c.lam),
            "dropout_prob": pa.array(c.dropout),
            "mean_order_value": pa.array(mean_order_value.round(4)),
            "is_alive_at_end": pa.array(alive),
        })

    # -- the continuation: one day after the window (or after earlier appended days) ------------------------
    def run_day(self, day: int, previous_batches: list[int]) -> None:
        """Generate day ``day`` after ``end_date`` (1 = the first) into this batch.

        BG/NBD is memoryless, so each customer's state at the end of the window is enough to continue:
        replaying only the per-customer draws of each chunk (cheap; no orders or lines) gives who is still
        alive and how many purchases she has left before dropping out. Each appended day then draws its own
        purchases from its own RNG streams, and new customers sign up at the window's average daily rate.
        Appended days hold orders, order lines and the new customers; not returns of earlier orders (a
        return is placed in its purchase's batch or dropped when it falls outside it) nor web events.
        """
        p = self.params
        world = self._set_world()
        with self.batch.conn.cursor() as cur:
            last = cur.execute("select max(order_id) from raw.orders where _batch_id = any(%s)",
                               [previous_batches]).fetchone()[0]
        self.n_orders = int(last[1:]) if last else 0  # order numbers continue after the earlier batches'
        # Intensity of the appended days on the window's seasonal curve (same normaliser).
        extra_intensity = _seasonal_intensity(world.segments, p.start_date, p.days + np.arange(day)) \
            / world.intensity_norm
        day_start = world.start_ts + (p.days + day - 1) * SECONDS_PER_DAY

        buyers: list[tuple[_Cohort, pa.Array, np.ndarray]] = []  # (cohort, ids, purchases today)
        for index in range(-(-p.customers // CHUNK_CUSTOMERS)):
            first = index * CHUNK_CUSTOMERS
            count = min(CHUNK_CUSTOMERS, p.customers - first)
            rng = np.random.default_rng(np.random.SeedSequence(p.seed, spawn_key=(1 + index,)))
            c = self._draw_traits(rng, count)
            self._draw_window_timing(rng, c)
            left = np.where(c.alive, c.dies_at - c.total, 0)
            today = self._continued_purchases(c, left, extra_intensity, (1 + index,), 1, day)
            buyers.append(self._buyers(c, today, first))
        next_id = p.customers
        for signed_on in range(1, day + 1):
            c = self._signups(signed_on)
            # The signup order is the first purchase; the rest start the next day.
            today = self._continued_purchases(c, c.dies_at - 1, extra_intensity, (SIGNUP_KEY, signed_on),
                                              signed_on + 1, day)
            buyers.append(self._buyers(c, today, next_id, everyone=signed_on == day))
            if signed_on == day:
                new_customers, new_ids, new_first = c, buyers[-1][1], next_id
            next_id += c.n

        rng = np.random.default_rng(np.random.SeedSequence(p.seed, spawn_key=(DAY_KEY, day)))
        pop, ids, today = self._concat_buyers(buyers)
        # Today's signups are the last cohort: their first order follows their signup, like in the window.
        n_pop = pop.n
        signup_cust = n_pop - new_customers.n + np.arange(new_customers.n)
        repeat_cust = np.repeat(np.arange(n_pop), today)
        order_cust = np.concatenate([signup_cust, repeat_cust])
        order_sec = np.concatenate([new_customers.signup_sec + rng.integers(60, 3000, new_customers.n),
                                    _time_of_day(rng.random(repeat_cust.size))])
        order_ts = day_start + order_sec
        by_time = np.argsort(_sort_key(order_cust, order_ts - world.start_ts))
        order_cust, order_ts = order_cust[by_time], order_ts[by_time]
        orders, lines, *_ = self._orders_and_lines(rng, pop, order_cust, order_ts, ids, day_start + SECONDS_PER_DAY)
        customers, is_test = self._customers(rng, new_customers.n, new_ids, new_customers.seg,
                                             new_customers.signup_day, new_customers.signup_sec)
        self._count("test_account_customers", int(is_test.sum()))
        for table, frame in (("raw.customers", customers), ("raw.orders", orders), ("raw.order_lines", lines)):
            self.batch.copy(table, frame, binary=True)
        copy_in(self.batch.conn, "audit.planted_customers",
                self._planted(new_customers, new_ids, new_customers.dies_at > 1), binary=True)
        self.batch.report.lines_read = self.lines_generated
        self.batch.record_truth("append_day", {
            "day": day, "date": (p.resolved_end_date + timedelta(days=day)).isoformat(),
            "new_customers": int(new_customers.n),
            "first_new_customer_number": new_first + 1, "repeat_purchases": int(repeat_cust.size),
            "dirt": {k: v for k, v in self.dirt.items() if k.startswith("dirt.")},
        })
        self.batch.record_truth("rows", dict(self.batch.report.rows_loaded))

    def _continued_purchases(self, c: _Cohort, left: np.ndarray, intensity: np.ndarray, key: tuple,
                             first_day: int, day: int) -> np.ndarray:
        """Purchases of each customer on appended day ``day``: Poisson on each day from ``first_day`` on (its
        own stream per cohort and day, so day d's draws do not depend on how many days are appended), capped
        by the purchases she has left before dropping out."""
        left = left.copy()
        today = np.zeros(c.n, np.int64)
        for d in range(first_day, day + 1):
            rng = np.random.default_rng(np.random.SeedSequence(self.params.seed, spawn_key=(*key, d)))
            today = np.minimum(rng.poisson(c.lam * intensity[c.seg, d - 1]), left)
            left -= today
        return today

    def _signups(self, day: int) -> _Cohort:
        """New customers of appended day ``day``: the window's average daily signups, same segment mix."""
        p = self.params
        rng = np.random.default_rng(np.random.SeedSequence(p.seed, spawn_key=(SIGNUP_KEY, day)))
        n = int(rng.poisson(p.customers * (1 - p.pre_existing_share) / p.days))
        c = self._draw_traits(rng, n)
        c.signup_day = np.full(n, p.days + day - 1)
        c.signup_sec = _time_of_day(rng.random(n)).clip(0, 23 * 3600)
        c.dies_at = rng.geometric(c.dropout)
        return c

    def _buyers(self, c: _Cohort, today: np.ndarray, first: int, everyone: bool = False):
        """(cohort, ids, purchases today) of the customers of ``c`` who buy today, or of all of them (today's
        signups, whose first order is today). ``first``: the cohort's first customer number minus one."""
        keep = np.arange(c.n) if everyone else np.flatnonzero(today > 0)
        sub = _Cohort(n=keep.size, seg=c.seg[keep], lam=c.lam[keep], dropout=c.dropout[keep],
                      basket_extra=c.basket_extra[keep], qty_extra=c.qty_extra[keep], taste=c.taste[keep])
        return sub, _ids("C", first + 1 + keep, self._id_width("C")), today[keep]

    @staticmethod
    def _concat_buyers(buyers) -> tuple[_Cohort, pa.Array, np.ndarray]:
        cohorts = [b[0] for b in buyers]
        pop = _Cohort(n=sum(c.n for c in cohorts))
        for name in ("seg", "lam", "dropout", "basket_extra", "qty_extra", "taste"):
            setattr(pop, name, np.concatenate([getattr(c, name) for c in cohorts]))
        ids = pa.concat_arrays([b[1] for b in buyers])
        return pop, ids, np.concatenate([b[2] for b in buyers])

    def _pick_products(self, rng, line_seg, taste, line_cust) -> np.ndarray:
        """Category from the customer's taste, then product from the segment's within-category weights."""
        K = self.params.n_categories
        n = taste.shape[0]
        cum_taste = np.cumsum(taste, axis=1)
        cum_taste[:, -1] = 1.0
        flat = (np.arange(n)[:, None] + cum_taste).ravel()  # monotone: customer i's taste lives in [i, i+1]
        category = np.searchsorted(flat, line_cust + rng.random(line_cust.size) * 0.999999, side="right") \
            - line_cust * K
        category = category.clip(0, K - 1)
        return self._product_in_category(rng, line_seg, category)

    def _product_in_category(self, rng, seg, category) -> np.ndarray:
        w, K = self.world, self.params.n_categories
        P = w.product_price.size
        key = seg * K + category + rng.random(seg.size) * 0.999999
        pos = np.searchsorted(w.choice_cum, key, side="right") - seg * P
        return pos.clip(w.cat_start[category], w.cat_start[category + 1] - 1)

    def _measure_bundles(self, line_order, line_product, completed, n_orders) -> None:
        """Count baskets with each bundle's first item, its companions, and both (completed orders only)."""
        w = self.world
        keep = completed[line_order]
        rows = line_order[keep]
        P = w.product_price.size
        incidence = sp.csr_matrix((np.ones(rows.size, np.int8), (rows, line_product[keep])), shape=(n_orders, P))
        items = np.unique(w.bundles[w.bundles >= 0])
        present = (incidence[:, items].toarray() > 0)
        column = {item: j for j, item in enumerate(items)}
        counts = np.zeros((len(w.bundles), 3), np.int64)
        for i, bundle in enumerate(w.bundles):  # ≤ 10 bundles
            members = [column[x] for x in bundle if x >= 0]
            has_first = present[:, members[0]]
            has_rest = present[:, members[1:]].all(axis=1)
            counts[i] = [has_first.sum(), has_rest.sum(), (has_first & has_rest).sum()]
        self.bundle_counts = counts if self.bundle_counts is None else self.bundle_counts + counts
        self.n_baskets += int(completed.sum())

    def _customers(self, rng, n, customer_ids, seg, signup_day, signup_sec):
        p, w = self.params, self.world
        canonical_gender = rng.choice(3, size=n, p=[0.47, 0.48, 0.05])  # M, F, U
        first_pick = np.where(canonical_gender == 1, rng.integers(0, FEMALE_FIRST_NAMES, n),
                              np.where(canonical_gender == 0,
                                       rng.integers(FEMALE_FIRST_NAMES, len(FIRST_NAMES), n),
                                       rng.integers(0, len(FIRST_NAMES), n)))
        last_pick = rng.integers(0, len(LAST_NAMES), n)
        first_names = pa.array(FIRST_NAMES).take(pa.array(first_pick))
        last_names = pa.array(LAST_NAMES).take(pa.array(last_pick))
        full_name = pc.binary_join_element_wise(first_names, last_names, " ")
        local = pc.binary_join_element_wise(
            pc.utf8_lower(first_names),
            pc.utf8_lower(pc.replace_substring_regex(last_names, r"[^A-Za-z]", "")),
            ".",
        )
        digits = _ids("", rng.integers(0, 10_000, n), 4)
        domain_pick = rng.integers(0, len(EMAIL_DOMAINS), n)
        test = rng.random(n) < p.test_account_rate
        test_kind = rng.integers(0, 3, n)  # 0: flag only, 1: test email only, 2: both
        is_test_flag = test & (test_kind != 1)
        test_email = test & (test_kind != 0)
        domains = pa.array([*EMAIL_DOMAINS, TEST_EMAIL_DOMAIN]).take(
            pa.array(np.where(test_email, len(EMAIL_DOMAINS), domain_pick)))
        email = pc.binary_join_element_wise(pc.binary_join_element_wise(local, digits, ""), domains, "@")
        bad_email = rng.random(n) < p.bad_email_rate
        # Half typed " at " for '@', half lost it.
        no_at = pc.if_else(pa.array(rng.random(n) < 0.5), pc.replace_substring(email, "@", " at "),
                           pc.replace_substring(email, "@", ""))
        email = pc.if_else(pa.array(bad_email), no_at, email)

        # Gender: canonical M / F / null, or one of the spellings other sources use.
        variant = rng.random(n) < p.gender_variant_rate
        spell_vocab = ["M", "F", None] + [v for g in "MFU" for v in GENDER_VARIANTS[g]]
        variant_pick = 3 + canonical_gender * 4 + rng.integers(0, 4, n)
        gender = pa.array(spell_vocab, pa.string()).take(pa.array(np.where(variant, variant_pick, canonical_gender)))
        for g, code in (("M", 0), ("F", 1), ("U", 2)):
            self._count(f"gender_{g}", int((canonical_gender == code).sum()), dirt=False)
        self._count("gender_variant_spellings", int(variant.sum()))

        # Birth dates: adults 18..85, some missing, some impossible (1900-01-01 or in the future).
        end = np.datetime64(p.resolved_end_date.isoformat(), "D")
        age_days = (rng.gamma(6.0, 7.0, n) + 18).clip(18, 85) * 365.25
        birth = (end - age_days.astype(np.int64)).astype("datetime64[D]")
        bad_birth = rng.random(n) < p.bad_birth_date_rate
        missing_birth = ~bad_birth & (rng.random(n) < p.missing_birth_date_rate)
        impossible = np.where(rng.random(n) < 0.5, np.datetime64("1900-01-01"),
                              end + rng.integers(1, 3000, n).astype("timedelta64[D]"))
        birth = np.where(bad_birth, impossible, birth)
        birth_arr = pa.array(birth.astype("datetime64[D]"), pa.date32(), mask=missing_birth)
        self._count("bad_birth_dates", int(bad_birth.sum()))
        self._count("missing_birth_dates", int(missing_birth.sum()), dirt=False)

        weights = np.array([pl[2] for pl in PLACES], float)
        place = rng.choice(len(PLACES), size=n, p=weights / weights.sum())
        bad_country = rng.random(n) < p.bad_country_rate
        countries = [pl[0] for pl in PLACES]
        country_vocab = countries + [c.lower() for c in countries] + [f" {c} " for c in countries] \
            + [f"{c}  " for c in countries]
        country_pick = np.where(bad_country, place + len(PLACES) * rng.integers(1, 4, n), place)
        self._count("bad_countries", int(bad_country.sum()))

        channel_p = np.array([c[1] for c in ACQUISITION_CHANNELS])
        acq = rng.choice(len(ACQUISITION_CHANNELS), size=n, p=channel_p)
        signup_ts = w.start_ts + signup_day.astype(np.int64) * SECONDS_PER_DAY + signup_sec
        table = pa.table({
            "customer_id": customer_ids,
            "email": email,
            "full_name": full_name,
            "gender": gender,
            "birth_date": birth_arr,
            "country": pa.array(country_vocab).take(pa.array(country_pick)),
            "city": pa.array([pl[1] for pl in PLACES]).take(pa.array(place)),
            "signup_at": pa.array(signup_ts, pa.timestamp("s")),
            "acquisition_channel": pa.array([c[0] for c in ACQUISITION_CHANNELS]).take(pa.array(acq)),
            "is_test_account": pa.array(is_test_flag),
        })
        self._count("bad_emails", int(bad_email.sum()))
        return table, test

    def _web_events(self, rng, tracked, customer_ids, seg, taste, start_day, order_cust, order_ts,
                    order_channel, line_order, line_product) -> pa.Table:
        """Sessions before online orders (views and carts of the bought items) and browse-only sessions."""
        p, w = self.params, self.world
        online = tracked[order_cust] & (order_channel <= 1)  # web or app orders of tracked customers
        session_of_order = np.full(order_cust.size, -1)
        session_of_order[online] = np.arange(online.sum())
        n_order_sessions = int(online.sum())
        parts: list[tuple] = []  # (session, customer, event type 0 view / 1 cart / 2 search, product, ts)

        def add(session, cust, kind, product, ts):
            parts.append((session, cust, np.full(session.size, kind, np.int8), product, ts))

        ol = np.flatnonzero(online[line_order])
        view = ol[rng.random(ol.size) < 0.9]
        cart = ol[rng.random(ol.size) < 0.75]
        for lines, kind, lead in ((view, 0, (300, 2400)), (cart, 1, (30, 300))):
            o = line_order[lines]
            add(session_of_order[o], order_cust[o], kind, line_product[lines],
                order_ts[o] - rng.integers(*lead, lines.size))
        # Searches at the start of some order sessions (no product).
        so = np.flatnonzero(online)
        so = so[rng.random(so.size) < 0.4]
        add(session_of_order[so], order_cust[so], 2, np.full(so.size, -1), order_ts[so] - rng.integers(2400, 3600, so.size))

        # Browse-only sessions, about one per two orders, spread over the customer's active period.
        cust = np.flatnonzero(tracked)
        orders_per_cust = np.bincount(order_cust, minlength=tracked.size)[cust]
        n_browse = rng.poisson(0.5 * orders_per_cust + 0.3)
        b_cust = np.repeat(cust, n_browse)
        span = p.days - start_day[b_cust]
        b_day = start_day[b_cust] + np.floor(rng.random(b_cust.size) * span).astype(np.int64)
        b_ts = w.start_ts + b_day * SECONDS_PER_DAY + _time_of_day(rng.random(b_cust.size))
        b_session = n_order_sessions + np.arange(b_cust.size)
        v_sess = np.repeat(np.arange(b_cust.size), 1 + rng.poisson(1.5, b_cust.size))
        v_cust = b_cust[v_sess]
        add(b_session[v_sess], v_cust, 0, self._pick_products(rng, seg[v_cust], taste, v_cust),
            b_ts[v_sess] + rng.integers(0, 1800, v_sess.size))
        searched = np.flatnonzero(rng.random(b_cust.size) < 0.5)
        add(b_session[searched], b_cust[searched], 2, np.full(searched.size, -1), b_ts[searched] - 60)
        ev_session, ev_cust, ev_type, ev_product, ev_ts = (list(col) for col in zip(*parts, strict=True))

        session = np.concatenate(ev_session)
        ts = np.minimum(np.concatenate(ev_ts), w.end_ts - 1)
        order = np.argsort(_sort_key(session, ts - w.start_ts))
        session, ts = session[order], ts[order]
        ev_cust_all = np.concatenate(ev_cust)[order]
        kind = np.concatenate(ev_type)[order]
        product = np.concatenate(ev_product)[order]
        session_ids = _ids("S", self.n_sessions + 1 + session, self._id_width("S"))
        self.n_sessions += n_order_sessions + b_cust.size
        product_ids = pc.if_else(pa.array(product >= 0), w.product_ids.take(pa.array(product.clip(0))),
                                 pa.scalar(None, pa.string()))
        return pa.table({
            "customer_id": customer_ids.take(pa.array(ev_cust_all)),
            "session_id": session_ids,
            "event_type": pa.array(["view", "cart", "search"]).take(pa.array(kind)),
            "product_id": product_ids,
            "event_at": pa.array(ts, pa.timestamp("s")),
        })

    # -- bookkeeping and truth ---------------------------------------------------------------------------
    def _id_width(self, prefix: str) -> int:
        # Wide enough for 1M customers / ~100M orders / ~1G sessions; grows for bigger runs.
        base = {"C": 7, "O": 8, "S": 9}[prefix]
        scale = {"C": self.params.customers, "O": self.params.customers * 60, "S": self.params.customers * 60}
        return max(base, len(str(scale[prefix])))

    def _count(self, key: str, n: int, dirt: bool = True) -> None:
        name = ("dirt." if dirt else "") + key
        self.dirt[name] = self.dirt.get(name, 0) + n

    def _record_truth(self) -> None:
        p, w, batch = self.params, self.world, self.batch
        conn = batch.conn
        rates = {
            "duplicate_order_lines": ("raw.order_lines", p.duplicate_line_rate,
                                      "exact second copies of order lines (same order_id, line_no)"),
            "duplicate_orders": ("raw.orders", p.duplicate_order_rate, "exact second copies of order rows"),
            "orders_missing_customer": ("raw.orders", p.missing_customer_rate,
                                        "orders with customer_id null (rate among purchases never returned)"),
            "future_orders": ("raw.orders", p.future_order_rate,
                              "orders dated after end_date (rate among purchases never returned)"),
            "bad_unit_price_lines": ("raw.order_lines", p.bad_price_rate, "unit_price zero or negative"),
            "bad_emails": ("raw.customers", p.bad_email_rate, "email without '@'"),
            "gender_variant_spellings": ("raw.customers", p.gender_variant_rate,
                                         "gender not in canonical M / F / null"),
            "bad_countries": ("raw.customers", p.bad_country_rate, "country lowercase or with stray spaces"),
            "bad_birth_dates": ("raw.customers", p.bad_birth_date_rate, "birth_date 1900-01-01 or after end_date"),
            "test_account_customers": ("raw.customers", p.test_account_rate,
                                       "is_test_account true and/or email @" + TEST_EMAIL_DOMAIN),
            "cancelled_orders": ("raw.orders", p.cancel_rate, "status 'cancelled' (positive quantities)"),
            "return_orders": ("raw.orders", p.return_rate, "status 'returned' (negative quantities)"),
        }
        for key, (table, rate, meaning) in rates.items():
            batch.record_truth(f"dirt.{key}", {"table": table, "rate": rate, "count": self.dirt.get(f"dirt.{key}", 0),
                                               "meaning": meaning})
        batch.record_truth("params", {"generator_version": GENERATOR_VERSION, **p.canonical()})
        batch.record_truth("calendar", {"start_date": p.start_date.isoformat(),
                                        "end_date": p.resolved_end_date.isoformat(), "days": p.days})
        batch.record_truth("segments", [
            {"segment": s.name, "customers": int(self.segment_counts[i]), "alive_at_end": int(self.alive_counts[i]),
             "share": round(float(w.seg_share[i]), 4), "orders_per_year": s.orders_per_year,
             "dropout_mean": s.dropout_mean, "basket_mean": s.basket_mean, "quantity_mean": s.quantity_mean,
             "discount_share": s.discount_share, "price_tilt": s.price_tilt, "december_boost": s.december_boost,
             "category_taste": {CATEGORIES[k][0]: round(float(t), 4) for k, t in enumerate(w.seg_taste[i])}}
            for i, s in enumerate(w.segments)
        ])
        batch.record_truth("customers_gender", {g: self.dirt.get(f"gender_{g}", 0) for g in "MFU"})
        batch.record_truth("missing_birth_dates", {"rate": p.missing_birth_date_rate,
                                                   "count": self.dirt.get("missing_birth_dates", 0)})
        batch.record_truth("rows", dict(batch.report.rows_loaded))

        # Bundles: rule first item → companions, measured over completed purchase baskets.
        counts, N = self.bundle_counts, max(self.n_baskets, 1)
        n_first, n_rest, n_all = counts[:, 0], counts[:, 1], counts[:, 2]
        support = n_all / N
        confidence = np.divide(n_all, n_first, out=np.zeros(len(counts)), where=n_first > 0)
        lift = np.divide(confidence, n_rest / N, out=np.zeros(len(counts)), where=n_rest > 0)
        product_ids = w.product_ids.to_pylist()
        with conn.cursor() as cur:
            cur.executemany(  # ≤ 10 rows
                "insert into audit.planted_bundles (batch_id, bundle_id, product_ids, add_prob, support, "
                "confidence, lift) values (%s, %s, %s, %s, %s, %s, %s)",
                [(batch.batch_id, i + 1, [product_ids[x] for x in bundle if x >= 0], float(w.bundle_add_prob[i]),
                  float(support[i]), float(confidence[i]), float(lift[i])) for i, bundle in enumerate(w.bundles)],
            )
        batch.record_truth("bundles_measured_on", {"baskets": int(self.n_baskets),
                                                   "what": "completed purchase orders, distinct products"})


# ---------------------------------------------------------------------------------------------------------
# Small vectorised helpers
# ---------------------------------------------------------------------------------------------------------
def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """Zero-padded text ids (``C0000001``) built as one Arrow string buffer: no per-row Python."""
    numbers = np.asarray(numbers, dtype=np.int64)
    head = np.frombuffer(prefix.encode(), np.uint8)
    n, w = numbers.size, len(head) + width
    buf = np.empty((n, w), np.uint8)
    buf[:, : len(head)] = head
    rest = numbers.copy()
    for j in range(w - 1, len(head) - 1, -1):  # one pass per digit, not per row
        buf[:, j] = 48 + rest % 10
        rest //= 10
    offsets = np.arange(n + 1, dtype=np.int64) * w
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf.reshape(-1))).cast(pa.string())


_HOUR_CUM = np.concatenate([[0.0], np.cumsum(HOUR_WEIGHTS) / HOUR_WEIGHTS.sum()])


def _time_of_day(u: np.ndarray) -> np.ndarray:
    """Seconds after midnight from uniforms, following HOUR_WEIGHTS (monotone in u)."""
    hour = np.searchsorted(_HOUR_CUM, u, side="right") - 1
    hour = hour.clip(0, 23)
    within = (u - _HOUR_CUM[hour]) / (_HOUR_CUM[hour + 1] - _HOUR_CUM[hour])
    return (hour * 3600 + within.clip(0, 0.9999) * 3600).astype(np.int64)


def _inverse_intensity(cum: np.ndarray, intensity: np.ndarray, seg: np.ndarray, target: np.ndarray):
    """Day and fraction of day where each segment's cumulative seasonal intensity reaches ``target``."""
    S, D1 = cum.shape
    spacing = cum[:, -1].max() + 10.0  # segment s's curve lives in [s·spacing, s·spacing + days]
    flat = (cum + np.arange(S)[:, None] * spacing).ravel()
    pos = np.searchsorted(flat, target + seg * spacing, side="right") - 1 - seg * D1
    day = pos.clip(0, D1 - 2)
    frac = ((target - cum[seg, day]) / intensity[seg, day]).clip(0, 0.999999)
    return day, frac


def _sort_key(major: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """One int64 key ordering by ``major`` then ``seconds`` (a single argsort is ~5x faster than lexsort).

    ``seconds`` counts from the window start and stays within −2^32..2^32 (±136 years); ``major`` is a
    chunk-local index, far below 2^29.
    """
    return (major.astype(np.int64) << 33) + (seconds.astype(np.int64) + (1 << 32))


def _epoch(day: date) -> int:
    """Seconds since 1970-01-01 of a day's midnight (timestamps are naive, like the raw columns)."""
    return (day - date(1970, 1, 1)).days * SECONDS_PER_DAY

"""Seeded synthetic transactions with labelled fraud episodes and realistic look-alikes (pure: no
Kafka, no wall clock).

The generator is the ground truth of detection-quality measurements. Three kinds of traffic, all
judged against the default rule thresholds (the parameters of the default rules,
``fraudstream.rules.kinds.KINDS[...].defaults``):

* normal traffic (``fraud_pattern`` null) never satisfies any rule: a user's normal transactions
  are at least 21 s apart (four never fit in 60 s), their PayPal payments under 50 at least 81 s
  apart (four never fit in 240 s), and a user changes city only after more than 120 s of silence;
* fraud episodes, started with probability ``fraud_ratio`` per emitted event, each satisfy
  exactly their own rule and no other (``fraud_pattern`` = that rule id, ``is_fraud`` true);
* the *scenario mix* (``scenario_rates``, see ``SCENARIOS`` and docs/traffic.md), each started
  with its own probability per emitted event: hard negatives, legitimate behaviour that looks like
  fraud (``is_fraud`` false, ``fraud_pattern`` = the scenario name, e.g. ``legit_traveller``),
  each tripping only the rule it imitates and that with a documented probability
  (``TRIP_RATES``); and evading fraud (``is_fraud`` true, ``fraud_pattern`` = the rule meant to
  catch it) that never trips any rule. With the default mix, measured precision and recall are
  below 1, as on real traffic; ``scenario_rates=NO_SCENARIOS`` gives the clean stream (the
  stream of the same seed without the mix, identical event for event).

Every episode runs on a user who is silent for 250 s (longer than the largest window) before and
after it, so no normal event joins it.

Event time is always supplied by the caller: wall-clock milliseconds in the producer, a simulated
clock (start + nominal rate) in :meth:`TransactionGenerator.generate`. The same seed and the same
clock readings give the identical stream; only ``random.Random(seed)`` and a seeded Faker
instance are used, never global random state.

Users are picked at random among those currently free. A user is busy for 21-25 s after each
transaction, and an episode holds its user for its span plus up to 250 s of silence on each side,
so the pool must hold at least ~25 x rate users, ~49 x rate at the default 2 % fraud ratio and
default mix (:func:`users_needed`; the default 5000 covers ~100 tx/s). When nobody is free the
event comes from a freshly created extra user instead of breaking the guarantee, so
unlimited-rate runs grow the population (see ``extra_users``).
"""

from __future__ import annotations

import heapq
import json
import math
import random
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final

from faker import Faker

from fraudstream.rules.kinds import KINDS, MICROS
from fraudstream.schemas import (
    HIGH_VALUE,
    MULTI_LOCATION,
    PAYMENT_METHODS,
    PAYPAL,
    PAYPAL_MICRO,
    RULES,
    VELOCITY,
    Transaction,
    format_timestamp,
)

__all__ = [
    "CITIES",
    "CITY_COUNTRY",
    "CITY_UTC_OFFSET",
    "CURRENCY_BY_COUNTRY",
    "DEFAULT_SCENARIO_RATES",
    "EVADING",
    "HARD_NEGATIVES",
    "HIGH_VALUE_AMOUNT",
    "IMITATES",
    "ISOLATION_MS",
    "LEGIT_NIGHT_SHIFT",
    "MULTI_LOCATION_WINDOW_MS",
    "NORMAL_MIN_GAP_MS",
    "NO_SCENARIOS",
    "PAYPAL_MICRO_AMOUNT",
    "PAYPAL_MICRO_COUNT",
    "PAYPAL_MICRO_WINDOW_MS",
    "SCENARIOS",
    "TRIP_RATES",
    "VELOCITY_COUNT",
    "VELOCITY_WINDOW_MS",
    "TransactionGenerator",
    "encode_transaction",
    "iter_replay",
    "scenario_rates",
    "to_ms",
    "users_needed",
]

# --- places -------------------------------------------------------------------------------------

#: City -> (latitude, longitude). The dashboard map imports this table.
CITIES: Final[dict[str, tuple[float, float]]] = {
    "Paris": (48.8566, 2.3522),
    "Lyon": (45.7640, 4.8357),
    "Marseille": (43.2965, 5.3698),
    "Berlin": (52.5200, 13.4050),
    "Munich": (48.1351, 11.5820),
    "Hamburg": (53.5511, 9.9937),
    "Frankfurt": (50.1109, 8.6821),
    "Madrid": (40.4168, -3.7038),
    "Barcelona": (41.3874, 2.1686),
    "Valencia": (39.4699, -0.3763),
    "Rome": (41.9028, 12.4964),
    "Milan": (45.4642, 9.1900),
    "Amsterdam": (52.3676, 4.9041),
    "Rotterdam": (51.9244, 4.4777),
    "Brussels": (50.8503, 4.3517),
    "Vienna": (48.2082, 16.3738),
    "Zurich": (47.3769, 8.5417),
    "Geneva": (46.2044, 6.1432),
    "London": (51.5072, -0.1276),
    "Manchester": (53.4808, -2.2426),
    "Edinburgh": (55.9533, -3.1883),
    "Dublin": (53.3498, -6.2603),
    "Lisbon": (38.7223, -9.1393),
    "Porto": (41.1579, -8.6291),
    "Stockholm": (59.3293, 18.0686),
    "Copenhagen": (55.6761, 12.5683),
    "Oslo": (59.9139, 10.7522),
    "Helsinki": (60.1699, 24.9384),
    "Warsaw": (52.2297, 21.0122),
    "Krakow": (50.0647, 19.9450),
    "Prague": (50.0755, 14.4378),
    "Budapest": (47.4979, 19.0402),
    "Athens": (37.9838, 23.7275),
    "New York": (40.7128, -74.0060),
    "Los Angeles": (34.0522, -118.2437),
    "Chicago": (41.8781, -87.6298),
    "Houston": (29.7604, -95.3698),
    "San Francisco": (37.7749, -122.4194),
    "Seattle": (47.6062, -122.3321),
    "Miami": (25.7617, -80.1918),
    "Boston": (42.3601, -71.0589),
    "Denver": (39.7392, -104.9903),
}

#: City -> ISO 3166 country code.
CITY_COUNTRY: Final[dict[str, str]] = {
    "Paris": "FR", "Lyon": "FR", "Marseille": "FR",
    "Berlin": "DE", "Munich": "DE", "Hamburg": "DE", "Frankfurt": "DE",
    "Madrid": "ES", "Barcelona": "ES", "Valencia": "ES",
    "Rome": "IT", "Milan": "IT",
    "Amsterdam": "NL", "Rotterdam": "NL", "Brussels": "BE", "Vienna": "AT",
    "Zurich": "CH", "Geneva": "CH",
    "London": "GB", "Manchester": "GB", "Edinburgh": "GB",
    "Dublin": "IE", "Lisbon": "PT", "Porto": "PT",
    "Stockholm": "SE", "Copenhagen": "DK", "Oslo": "NO", "Helsinki": "FI",
    "Warsaw": "PL", "Krakow": "PL", "Prague": "CZ", "Budapest": "HU", "Athens": "GR",
    "New York": "US", "Los Angeles": "US", "Chicago": "US", "Houston": "US",
    "San Francisco": "US", "Seattle": "US", "Miami": "US", "Boston": "US", "Denver": "US",
}

#: Country -> ISO 4217 currency a card issued there is billed in.
CURRENCY_BY_COUNTRY: Final[dict[str, str]] = {
    "FR": "EUR", "DE": "EUR", "ES": "EUR", "IT": "EUR", "NL": "EUR", "BE": "EUR", "AT": "EUR",
    "IE": "EUR", "PT": "EUR", "FI": "EUR", "GR": "EUR",
    "CH": "CHF", "GB": "GBP", "SE": "SEK", "DK": "DKK", "NO": "NOK", "PL": "PLN", "CZ": "CZK",
    "HU": "HUF", "US": "USD",
}

#: Country -> UTC offset in hours, standard time (US cities by their own zone below).
_COUNTRY_UTC_OFFSET: Final[dict[str, int]] = {
    "GB": 0, "IE": 0, "PT": 0, "FI": 2, "GR": 2,
    **dict.fromkeys(("FR", "DE", "ES", "IT", "NL", "BE", "AT", "CH", "SE", "DK", "NO", "PL",
                     "CZ", "HU"), 1),
}
#: City -> UTC offset in hours, standard time (DST ignored); decides what "night" is locally.
CITY_UTC_OFFSET: Final[dict[str, int]] = {
    city: _COUNTRY_UTC_OFFSET.get(country, 0) for city, country in CITY_COUNTRY.items()
} | {"New York": -5, "Miami": -5, "Boston": -5, "Chicago": -6, "Houston": -6, "Denver": -7,
     "Los Angeles": -8, "San Francisco": -8, "Seattle": -8}

# --- rule thresholds the guarantees are built on (the default rules' parameters) -----------------


def _default(kind: str, param: str) -> float:
    return float(KINDS[kind].defaults[param])


def _window_ms(kind: str) -> int:
    """A default rule's window in whole milliseconds (integer: event times stay exact)."""
    return KINDS[kind].window_us(KINDS[kind].defaults) // (MICROS // 1000)


HIGH_VALUE_AMOUNT: Final = _default(HIGH_VALUE, "amount")
VELOCITY_COUNT: Final = int(_default(VELOCITY, "count"))
VELOCITY_WINDOW_MS: Final = _window_ms(VELOCITY)
MULTI_LOCATION_WINDOW_MS: Final = _window_ms(MULTI_LOCATION)
PAYPAL_MICRO_COUNT: Final = int(_default(PAYPAL_MICRO, "count"))
PAYPAL_MICRO_AMOUNT: Final = _default(PAYPAL_MICRO, "amount")
PAYPAL_MICRO_WINDOW_MS: Final = _window_ms(PAYPAL_MICRO)

#: Normal traffic spacing: count+1 events then span at least count x gap > window.
NORMAL_MIN_GAP_MS: Final = VELOCITY_WINDOW_MS // VELOCITY_COUNT + 1_000  # 21 s
NORMAL_GAP_JITTER_MS: Final = 4_000
PAYPAL_MICRO_MIN_GAP_MS: Final = PAYPAL_MICRO_WINDOW_MS // PAYPAL_MICRO_COUNT + 1_000  # 81 s
TRAVEL_MIN_GAP_MS: Final = MULTI_LOCATION_WINDOW_MS + 5_000
#: Silence around an episode, longer than the largest rule window.
ISOLATION_MS: Final = PAYPAL_MICRO_WINDOW_MS + 10_000
#: Users needed per tx/s of rate so that someone is always free.
USERS_PER_TX_PER_S: Final = (NORMAL_MIN_GAP_MS + NORMAL_GAP_JITTER_MS) // 1000

# --- the scenario mix: hard negatives and evading fraud (docs/traffic.md) -----------------------

LEGIT_TRAVELLER: Final = "legit_traveller"
LEGIT_BIG_TICKET: Final = "legit_big_ticket"
LEGIT_PAYPAL_BUNDLE: Final = "legit_paypal_bundle"
LEGIT_SHARED_CARD: Final = "legit_shared_card"
LEGIT_NIGHT_SHIFT: Final = "legit_night_shift"
#: Legitimate behaviour that looks like fraud: ``is_fraud`` false, ``fraud_pattern`` = the name.
HARD_NEGATIVES: Final = (LEGIT_TRAVELLER, LEGIT_BIG_TICKET, LEGIT_PAYPAL_BUNDLE,
                         LEGIT_SHARED_CARD, LEGIT_NIGHT_SHIFT)
#: Fraud the default rules cannot see -> the rule meant to catch it (its ``fraud_pattern``).
EVADING: Final[Mapping[str, str]] = MappingProxyType({
    "evading_high_value": HIGH_VALUE,  # a stolen card spent just under the amount limit
    "evading_velocity": VELOCITY,  # slow card testing: never 4 tries within 60 s
    "evading_multi_location": MULTI_LOCATION,  # a cloned card used > 120 s after the owner paid
    "evading_paypal_micro": PAYPAL_MICRO,  # small PayPal charges at least 81 s apart
})
#: Every scenario of the mix, in the order their rates are cumulated.
SCENARIOS: Final = (*HARD_NEGATIVES, *EVADING)
#: The rule each hard negative imitates (None: it trips no rule).
IMITATES: Final[Mapping[str, str | None]] = MappingProxyType({
    LEGIT_TRAVELLER: MULTI_LOCATION,
    LEGIT_BIG_TICKET: HIGH_VALUE,
    LEGIT_PAYPAL_BUNDLE: PAYPAL_MICRO,
    LEGIT_SHARED_CARD: VELOCITY,
    LEGIT_NIGHT_SHIFT: None,
})
#: Expected fraction of a hard negative's episodes that trip the rule it imitates (default rules):
#: travellers pay away 30-210 s after the home payment (within 120 s: 1/2); big tickets are all
#: above 3,500; bundles and shared cards hold 2-5 payments (more than 3: 1/2); night shifts and
#: every evading scenario trip nothing.
TRIP_RATES: Final[Mapping[str, float]] = MappingProxyType({
    LEGIT_TRAVELLER: 0.5, LEGIT_BIG_TICKET: 1.0, LEGIT_PAYPAL_BUNDLE: 0.5,
    LEGIT_SHARED_CARD: 0.5, LEGIT_NIGHT_SHIFT: 0.0,
    **dict.fromkeys(EVADING, 0.0),
})
#: Default probability per emitted event of starting each scenario (like ``fraud_ratio``).
#: With fraud_ratio 0.02 (0.005 per rule) they give each rule a precision of ~0.67-0.71 and a
#: recall of ~0.83 (docs/traffic.md has the measured table).
DEFAULT_SCENARIO_RATES: Final[Mapping[str, float]] = MappingProxyType({
    LEGIT_TRAVELLER: 0.004,
    LEGIT_BIG_TICKET: 0.0025,
    LEGIT_PAYPAL_BUNDLE: 0.004,
    LEGIT_SHARED_CARD: 0.004,
    LEGIT_NIGHT_SHIFT: 0.003,
    **dict.fromkeys(EVADING, 0.001),
})
#: The mix switched off: the clean stream, where labels are exact ground truth of the rules.
NO_SCENARIOS: Final[Mapping[str, float]] = MappingProxyType(dict.fromkeys(SCENARIOS, 0.0))
#: About how long a scenario holds its user: silence before and after plus its mean span.
SCENARIO_HOLD_MS: Final = 2 * ISOLATION_MS + 150_000
#: Night, local standard time (DST ignored): 22:00 to 06:00.
NIGHT_FROM_HOUR, NIGHT_TO_HOUR = 22, 6
#: Subscription prices billed together by PayPal (legit_paypal_bundle).
_SUBSCRIPTION_PRICES: Final = (2.99, 4.99, 5.99, 7.99, 9.99, 11.99, 12.99, 14.99, 17.99, 19.99)
_CARD: Final = PAYMENT_METHODS[0]
#: Rent by bank transfer, electronics by card (legit_big_ticket).
_BIG_TICKET_METHODS: Final = ("bank_transfer", _CARD)
#: Free users looked at for a night-shift worker whose city is at night (bounded: O(1)).
_NIGHT_CANDIDATES: Final = 16
_HOUR_MS: Final = 3_600_000


def scenario_rates(hard_negative_scale: float = 1.0, evading_scale: float = 1.0
                   ) -> dict[str, float]:
    """The default mix with the hard negatives' and the evading fraud's rates scaled (0: off);
    what the producer's PRODUCER_HARD_NEGATIVE_SCALE / PRODUCER_EVADING_SCALE select."""
    return {name: rate * (evading_scale if name in EVADING else hard_negative_scale)
            for name, rate in DEFAULT_SCENARIO_RATES.items()}

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_NEVER: Final = -(10**15)
_READY, _COOLING, _RESERVED = 0, 1, 2
_ARCHETYPES: Final = 32
_LAST_METHOD: Final = len(PAYMENT_METHODS) - 1  # guards float rounding at the top
_TRAVEL_PROBABILITY: Final = 0.01
#: Range of a user's median spend (log scale): 12 to 160.
_MU_LOW: Final = math.log(12.0)
_MU_HIGH: Final = math.log(160.0)

#: A user's fixed traits: home city index, device IP, currency, cumulative payment-method
#: weights, fallback non-PayPal method, and the log-normal spend parameters (mu, sigma).
Profile = tuple[int, str, str, list[float], str, float, float]

#: Latest event time (ms) allowed for any pending episode event, given how many would then be
#: pending; lets a caller with a known end refuse episodes that could not finish in time.
Deadline = Callable[[int], float]


def to_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime (exact: no float rounding of the millisecond)."""
    if moment.tzinfo is None:
        raise ValueError("event time must carry a timezone")
    return (moment - _EPOCH) // _ONE_MS


def users_needed(rate: float, fraud_ratio: float,
                 scenarios: Mapping[str, float] = DEFAULT_SCENARIO_RATES) -> int:
    """Users that keep someone free at ``rate`` tx/s: each is busy 21-25 s after a normal
    transaction, a fraud episode holds its user for up to ~2 x ISOLATION_MS plus its span, and
    a scenario of the mix (``scenarios``: its rates, default the default mix) for about
    SCENARIO_HOLD_MS."""
    mix = sum(scenarios.values())
    return math.ceil(rate * (USERS_PER_TX_PER_S + fraud_ratio * (2 * ISOLATION_MS) / 1000
                             + mix * SCENARIO_HOLD_MS / 1000))


class _TimestampFormatter:
    """format_timestamp() for epoch ms, caching the per-second prefix (hot path)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, ms: int) -> str:
        second, milli = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._prefix = format_timestamp(datetime.fromtimestamp(second, UTC))[:-4]
        return f"{self._prefix}{milli:03d}Z"


class TransactionGenerator:
    """Deterministic stream of transactions for ``users`` simulated users and ``merchants``
    merchants, starting a fraud episode with probability ``fraud_ratio`` per emitted event, and
    each scenario of the mix with its probability in ``scenario_rates`` (name -> rate; names
    left out keep their ``DEFAULT_SCENARIO_RATES``, 0 disables one, ``NO_SCENARIOS`` them all).

    One draw per emitted event decides: below ``fraud_ratio`` a fraud episode, then each
    scenario's slice in ``SCENARIOS`` order; should ``fraud_ratio`` plus the rates exceed 1, the
    scenarios last in that order get less than their rate."""

    def __init__(
        self,
        users: int = 5000,
        merchants: int = 200,
        fraud_ratio: float = 0.02,
        seed: int | None = None,
        *,
        travel_probability: float = _TRAVEL_PROBABILITY,
        scenario_rates: Mapping[str, float] | None = None,
    ) -> None:
        if users < 1 or merchants < 1:
            raise ValueError("users and merchants must be >= 1")
        if not 0.0 <= fraud_ratio <= 1.0:
            raise ValueError("fraud_ratio must be within [0, 1]")
        rates = dict(DEFAULT_SCENARIO_RATES)
        for name, rate in (scenario_rates or {}).items():
            if name not in rates:
                raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"the rate of scenario {name} must be within [0, 1]")
            rates[name] = float(rate)
        self.seed: int = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self.fraud_ratio = fraud_ratio
        self.scenario_rates: Mapping[str, float] = MappingProxyType(rates)
        self.travel_probability = travel_probability
        self.episodes_started: dict[str, int] = dict.fromkeys(RULES, 0)
        #: Scenario episodes started, by scenario name (evading ones are not in episodes_started).
        self.scenarios_started: dict[str, int] = dict.fromkeys(SCENARIOS, 0)
        self.initial_users = users
        # One draw per event: [0, fraud_ratio) fraud, then one slice per enabled scenario.
        self._scenario_names: list[str] = []
        self._scenario_bounds: list[float] = []
        bound = fraud_ratio
        for name in SCENARIOS:
            if rates[name] > 0.0:
                bound += rates[name]
                self._scenario_names.append(name)
                self._scenario_bounds.append(bound)
        self._episode_ratio = min(1.0, bound)

        self._rng = random.Random(self.seed)
        self._random = self._rng.random
        faker = Faker()
        faker.seed_instance(self.seed)
        self._city_names = list(CITIES)
        self._city_currency = [CURRENCY_BY_COUNTRY[CITY_COUNTRY[c]] for c in self._city_names]
        self._merchant_ids = [f"m{i:03d}" for i in range(merchants)]
        self._archetypes = [self._payment_archetype() for _ in range(_ARCHETYPES)]
        self._format_ts = _TimestampFormatter()
        self._city_offset_ms = [CITY_UTC_OFFSET[c] * _HOUR_MS for c in self._city_names]

        # Per-user columns (index = user number): id, profile and the mutable bookkeeping,
        # all O(1) per event.
        self._uid: list[str] = []
        self._profile: list[Profile] = []
        self._city: list[int] = []
        self._last_seen: list[int] = []
        self._last_micro: list[int] = []
        self._free_at: list[int] = []
        self._state: list[int] = []
        self._ready_pos: list[int] = []

        self._ready: list[int] = []  # free users, random pick with swap-remove
        self._cooling: list[tuple[int, int]] = []  # heap of (free_at, user); stale entries skipped
        self._lru: OrderedDict[int, None] = OrderedDict()  # non-reserved users, oldest first
        self._pending: list[tuple[int, int, Transaction]] = []  # heap of (time, seq, event)
        self._seq = 0
        self._clock = _NEVER
        for _ in range(users):
            self._new_user(self._make_profile(faker.ipv4_public()))
        # Episodes take the longest-idle user first; shuffle so that is not always u0000.
        order = list(range(users))
        self._rng.shuffle(order)
        self._lru = OrderedDict.fromkeys(order)

    # --- public API ---------------------------------------------------------------------------

    @property
    def extra_users(self) -> int:
        """Users created beyond ``users`` because nobody was free (rate too high for the pool)."""
        return len(self._uid) - self.initial_users

    @property
    def pending(self) -> int:
        """Scheduled episode events not emitted yet."""
        return len(self._pending)

    def next_pending_ms(self) -> int | None:
        return self._pending[0][0] if self._pending else None

    def next(self, now: datetime, deadline: Deadline | None = None) -> Transaction:
        """One transaction at event time ``now`` (or a due episode event, timestamped as
        scheduled)."""
        return self.next_at(to_ms(now), deadline)

    def next_at(self, now_ms: int, deadline: Deadline | None = None) -> Transaction:
        """Like :meth:`next` with epoch milliseconds (the producer's hot path)."""
        now_ms = self._tick(now_ms)
        if self._pending and self._pending[0][0] <= now_ms:
            return heapq.heappop(self._pending)[2]
        ratio = self._episode_ratio
        if ratio and (draw := self._random()) < ratio:
            if draw < self.fraud_ratio:
                event = self._start_episode(now_ms, deadline)
            else:
                names = self._scenario_names
                pick = min(bisect_right(self._scenario_bounds, draw), len(names) - 1)
                event = self._start_scenario(names[pick], now_ms, deadline)
            if event is not None:
                return event
        return self._normal(now_ms)

    def pop_due(self, now_ms: int, *, force: bool = False) -> Transaction | None:
        """The earliest pending episode event if due at ``now_ms`` (any time with ``force``)."""
        now_ms = self._tick(now_ms)
        if self._pending and (force or self._pending[0][0] <= now_ms):
            return heapq.heappop(self._pending)[2]
        return None

    def generate(self, count: int, start: datetime, rate: float) -> list[Transaction]:
        """Exactly ``count`` events on a simulated clock (``start`` + i / ``rate``). Episodes
        that could not finish within the stream are not started, so every labelled episode is
        complete."""
        if rate <= 0:
            raise ValueError("rate must be > 0")
        start_ms = to_ms(start)

        def tick(i: int) -> int:
            return start_ms + math.floor(i * 1000 / rate)

        out: list[Transaction] = []
        for i in range(count):
            now = tick(i)
            if count - i <= len(self._pending):
                event = self.pop_due(now, force=True)
                assert event is not None
                out.append(event)
                continue

            def deadline(pending: int, i: int = i) -> float:
                # The last `pending` ticks must be able to carry every pending event.
                slot = count - pending
                return tick(slot) if slot > i else -math.inf

            out.append(self.next_at(now, deadline))
        return out

    # --- users --------------------------------------------------------------------------------

    def _payment_archetype(self) -> tuple[list[float], str]:
        """Cumulative weights over PAYMENT_METHODS, and the favourite non-PayPal method."""
        rng = self._rng
        card = PAYMENT_METHODS[0]  # cards dominate every archetype
        weights = [rng.random() ** 2 + (1.0 if m == card else 0.05) for m in PAYMENT_METHODS]
        cumulative: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            cumulative.append(total)
        alternative = max((m for m in PAYMENT_METHODS if m != PAYPAL),
                          key=lambda m: weights[PAYMENT_METHODS.index(m)])
        return cumulative, alternative

    def _make_profile(self, ip: str) -> Profile:
        rnd = self._random
        home = int(rnd() * len(self._city_names))
        cumulative, alternative = self._archetypes[int(rnd() * _ARCHETYPES)]
        return (home, ip, self._city_currency[home], cumulative, alternative,
                _MU_LOW + (_MU_HIGH - _MU_LOW) * rnd(), 0.4 + 0.5 * rnd())

    def _new_user(self, profile: Profile | None = None, *, ready: bool = True) -> int:
        """Append a user (free, unless ``ready`` is False: the caller takes it at once). Extra
        users copy the profile of a random initial user: creating them is the hot path of
        unlimited-rate runs."""
        index = len(self._uid)
        if profile is None:
            profile = self._profile[int(self._random() * self.initial_users)]
        self._uid.append(f"u{index:04d}")
        self._profile.append(profile)
        self._city.append(profile[0])
        self._last_seen.append(_NEVER)
        self._last_micro.append(_NEVER)
        self._free_at.append(_NEVER)
        self._lru[index] = None
        if ready:
            self._state.append(_READY)
            self._ready_pos.append(len(self._ready))
            self._ready.append(index)
        else:
            self._state.append(_COOLING)
            self._ready_pos.append(-1)
        return index

    def _tick(self, now_ms: int) -> int:
        """Advance the (monotonic) clock and free users whose busy time has passed."""
        if now_ms < self._clock:
            now_ms = self._clock  # a wall clock stepping back must not shrink any spacing
        self._clock = now_ms
        cooling = self._cooling
        while cooling and cooling[0][0] <= now_ms:
            free_at, user = heapq.heappop(cooling)
            if self._free_at[user] != free_at or self._state[user] == _READY:
                continue  # stale: the user was reserved or re-scheduled since
            if self._state[user] == _RESERVED:
                self._lru[user] = None
            self._state[user] = _READY
            self._ready_pos[user] = len(self._ready)
            self._ready.append(user)
        return now_ms

    def _remove_ready(self, user: int) -> None:
        ready = self._ready
        pos = self._ready_pos[user]
        last = ready.pop()
        if last != user:
            ready[pos] = last
            self._ready_pos[last] = pos
        self._ready_pos[user] = -1

    def _episode_user(self, now_ms: int) -> tuple[int | None, int]:
        """The longest-idle user (None: a new one) and the earliest start that leaves them
        ISOLATION_MS of silence before the episode; they are reserved from now on, so no normal
        transaction can fall in between."""
        oldest = next(iter(self._lru), None)
        if oldest is None or not self._ready:
            return None, now_ms  # nobody free: the rate outgrew the users, as in _normal
        return oldest, max(now_ms, self._last_seen[oldest] + ISOLATION_MS)

    def _reserve(self, user: int | None, release_ms: int) -> int:
        """Keep ``user`` (a new one if None) off normal traffic until ``release_ms``."""
        if user is None:
            user = self._new_user(ready=False)
        elif self._state[user] == _READY:
            self._remove_ready(user)
        del self._lru[user]
        self._state[user] = _RESERVED
        self._free_at[user] = release_ms
        heapq.heappush(self._cooling, (release_ms, user))
        return user

    # --- events -------------------------------------------------------------------------------

    def _event(self, user: int, ms: int, amount: float, method: str, city: int,
               pattern: str | None, is_fraud: bool | None = None) -> Transaction:
        """One event of ``user``; ``is_fraud`` defaults to whether it carries a pattern."""
        profile = self._profile[user]
        merchants = self._merchant_ids
        return {
            "transaction_id": f"{self._rng.getrandbits(128):032x}",
            "user_id": self._uid[user],
            "amount": amount,
            "currency": profile[2],
            "timestamp": self._format_ts(ms),
            "location": self._city_names[city],
            "payment_method": method,
            "merchant_id": merchants[int(self._random() * len(merchants))],
            "device_ip": profile[1],
            "is_fraud": pattern is not None if is_fraud is None else is_fraud,
            "fraud_pattern": pattern,
        }

    def _usual_amount(self, user: int) -> float:
        """The user's log-normal spend, kept within [1, HIGH_VALUE_AMOUNT]."""
        profile = self._profile[user]
        amount = math.exp(self._rng.gauss(profile[5], profile[6]))
        if amount > HIGH_VALUE_AMOUNT:
            amount = 200.0 + (HIGH_VALUE_AMOUNT - 200.0) * self._random()
        elif amount < 1.0:
            amount += 1.0
        return round(amount, 2)

    def _usual_method(self, user: int) -> str:
        cumulative = self._profile[user][3]
        pick = self._random() * cumulative[-1]
        return PAYMENT_METHODS[min(bisect_right(cumulative, pick), _LAST_METHOD)]

    def _normal(self, now_ms: int) -> Transaction:
        """A normal transaction by a free user. The hot path of the producer, so the helpers
        (_take_free_user, _usual_amount, _usual_method, _event) are inlined here."""
        rnd = self._random
        ready = self._ready
        if ready:
            user = ready[int(rnd() * len(ready))]
            self._remove_ready(user)
        else:
            user = self._new_user(ready=False)
        home, ip, currency, cumulative, alternative, mu, sigma = self._profile[user]
        amount = math.exp(self._rng.gauss(mu, sigma))
        if amount > HIGH_VALUE_AMOUNT:
            amount = 200.0 + (HIGH_VALUE_AMOUNT - 200.0) * rnd()
        elif amount < 1.0:
            amount += 1.0
        amount = round(amount, 2)
        method = PAYMENT_METHODS[min(bisect_right(cumulative, rnd() * cumulative[-1]),
                                             _LAST_METHOD)]
        if method == PAYPAL and amount < PAYPAL_MICRO_AMOUNT:
            if now_ms - self._last_micro[user] < PAYPAL_MICRO_MIN_GAP_MS:
                method = alternative
            else:
                self._last_micro[user] = now_ms
        city = self._city[user]
        if now_ms - self._last_seen[user] >= TRAVEL_MIN_GAP_MS and rnd() < self.travel_probability:
            city = home if city != home and rnd() < 0.5 else self._other_city(city)
            self._city[user] = city
        self._last_seen[user] = now_ms
        self._lru.move_to_end(user)
        free_at = now_ms + NORMAL_MIN_GAP_MS + int(rnd() * NORMAL_GAP_JITTER_MS)
        self._free_at[user] = free_at
        self._state[user] = _COOLING
        heapq.heappush(self._cooling, (free_at, user))
        merchants = self._merchant_ids
        return {
            "transaction_id": f"{self._rng.getrandbits(128):032x}",
            "user_id": self._uid[user],
            "amount": amount,
            "currency": currency,
            "timestamp": self._format_ts(now_ms),
            "location": self._city_names[city],
            "payment_method": method,
            "merchant_id": merchants[int(rnd() * len(merchants))],
            "device_ip": ip,
            "is_fraud": False,
            "fraud_pattern": None,
        }

    def _other_city(self, city: int) -> int:
        other = self._rng.randrange(len(self._city_names) - 1)
        return other + 1 if other >= city else other

    def _start_episode(self, now_ms: int, deadline: Deadline | None) -> Transaction | None:
        """Plan one episode and schedule its events. Returns its first event when the episode
        starts right now; None when it starts later or was refused by ``deadline`` (the caller
        then emits a normal event)."""
        rng = self._rng
        pattern = RULES[int(self._random() * len(RULES))]
        offsets = _episode_offsets(rng, pattern)
        candidate, start_ms = self._episode_user(now_ms)
        placed = self._place(candidate, now_ms, start_ms, offsets, deadline)
        if placed is None:
            return None
        user, times, immediate = placed
        self.episodes_started[pattern] += 1
        end_ms = times[-1]
        city = self._city[user]
        events: list[Transaction] = []
        if pattern == HIGH_VALUE:
            amount = round(rng.uniform(HIGH_VALUE_AMOUNT + 0.01, 12_000.0), 2)
            events.append(self._event(user, start_ms, amount, self._usual_method(user), city,
                                      pattern))
        elif pattern == VELOCITY:
            # Card testing in one place; PayPal only at >= 50 so paypal_micro stays quiet.
            for at in times:
                amount = round(rng.uniform(5.0, 400.0), 2)
                method = self._usual_method(user)
                if method == PAYPAL and amount < PAYPAL_MICRO_AMOUNT:
                    amount = round(amount + PAYPAL_MICRO_AMOUNT, 2)
                events.append(self._event(user, at, amount, method, city, pattern))
        elif pattern == MULTI_LOCATION:
            # The card is used where the user is and, within minutes, somewhere else.
            cities = [city, self._other_city(city)]
            if len(times) == 3:
                cities.append(int(self._random() * len(self._city_names)))
            for at, place in zip(times, cities, strict=True):
                events.append(self._event(user, at, self._usual_amount(user),
                                          self._usual_method(user), place, pattern))
        else:
            for at in times:
                amount = round(rng.uniform(1.0, PAYPAL_MICRO_AMOUNT - 0.01), 2)
                events.append(self._event(user, at, amount, PAYPAL, city, pattern))
        self._last_seen[user] = end_ms
        return self._schedule(times, events, immediate)

    def _place(self, candidate: int, now_ms: int, start_ms: int, offsets: list[int],
               deadline: Deadline | None) -> tuple[int, list[int], bool] | None:
        """Reserve ``candidate`` for an episode of ``offsets`` from ``start_ms``: (user, event
        times, whether the first event is due now), or None when ``deadline`` refuses it."""
        end_ms = start_ms + offsets[-1]
        immediate = start_ms == now_ms
        scheduled = len(self._pending) + len(offsets) - immediate
        if deadline is not None and max(end_ms, self._latest_pending_ms()) > deadline(scheduled):
            return None
        user = self._reserve(candidate, end_ms + ISOLATION_MS)
        return user, [start_ms + offset for offset in offsets], immediate

    def _schedule(self, times: list[int], events: list[Transaction], immediate: bool
                  ) -> Transaction | None:
        """Queue an episode's events; its first one is returned when it is due right now."""
        for at, event in zip(times[immediate:], events[immediate:], strict=True):
            self._seq += 1
            heapq.heappush(self._pending, (at, self._seq, event))
        return events[0] if immediate else None

    # --- the scenario mix -----------------------------------------------------------------------

    def _start_scenario(self, name: str, now_ms: int, deadline: Deadline | None
                        ) -> Transaction | None:
        """Plan one episode of scenario ``name`` on an isolated user, as _start_episode does for
        fraud. Returns its first event when it starts right now; None when it starts later, was
        refused by ``deadline`` or (night shift) found nobody whose city is at night."""
        offsets = _scenario_offsets(self._rng, name)
        if name == LEGIT_NIGHT_SHIFT:
            candidate, start_ms = self._night_user(now_ms, offsets[-1])
            if candidate is None:
                return None
        else:
            candidate, start_ms = self._episode_user(now_ms)
        placed = self._place(candidate, now_ms, start_ms, offsets, deadline)
        if placed is None:
            return None
        user, times, immediate = placed
        self.scenarios_started[name] += 1
        events = self._scenario_events(name, user, times)
        self._last_seen[user] = times[-1]
        return self._schedule(times, events, immediate)

    def _night_user(self, now_ms: int, span_ms: int) -> tuple[int | None, int]:
        """A free user, among up to _NIGHT_CANDIDATES picked at random, whose current city is
        at night for the whole episode, and its start (after ISOLATION_MS of silence, as in
        _episode_user); (None, now_ms) if none of them is. Random, not longest-idle: the
        longest-idle users are mostly where it is day and would stay at the front."""
        ready = self._ready
        if not ready:
            return None, now_ms
        rnd = self._random
        for _ in range(_NIGHT_CANDIDATES):
            user = ready[int(rnd() * len(ready))]
            start_ms = max(now_ms, self._last_seen[user] + ISOLATION_MS)
            offset = self._city_offset_ms[self._city[user]]
            if _is_night(start_ms + offset) and _is_night(start_ms + span_ms + offset):
                return user, start_ms
        return None, now_ms

    def _scenario_events(self, name: str, user: int, times: list[int]) -> list[Transaction]:
        """The events of one scenario episode at ``times`` (see _scenario_offsets)."""
        rng = self._rng
        city = self._city[user]
        label = EVADING.get(name, name)
        fraud = name in EVADING
        events: list[Transaction] = []

        def add(at: int, amount: float, method: str, place: int = city,
                pattern: str | None = label) -> None:
            events.append(self._event(user, at, amount, method, place, pattern,
                                      fraud and pattern is not None))

        if name == LEGIT_TRAVELLER:
            # Pays at home, then at the airport or online in another city; stays there.
            away = self._other_city(city)
            for k, at in enumerate(times):
                add(at, self._usual_amount(user), self._usual_method(user),
                    city if k == 0 else away)
            self._city[user] = away
        elif name == LEGIT_BIG_TICKET:
            # Large payments under the limit (the history), then rent or electronics above it.
            for at in times[:-1]:
                add(at, round(rng.uniform(800.0, 3_400.0), 2), self._usual_method(user))
            amount = round(math.exp(rng.uniform(math.log(HIGH_VALUE_AMOUNT), math.log(9_000.0))),
                           2)
            add(times[-1], max(amount, HIGH_VALUE_AMOUNT + 0.01), rng.choice(_BIG_TICKET_METHODS))
        elif name == LEGIT_PAYPAL_BUNDLE:
            for at in times:
                add(at, rng.choice(_SUBSCRIPTION_PRICES), PAYPAL)
        elif name == LEGIT_SHARED_CARD:
            for at in times:
                add(at, self._usual_amount(user), _CARD)
        elif name == LEGIT_NIGHT_SHIFT:
            for at in times:
                add(at, self._usual_amount(user), self._usual_method(user))
        elif name == "evading_high_value":
            add(times[0], round(rng.uniform(2_000.0, HIGH_VALUE_AMOUNT), 2),
                self._usual_method(user))
        elif name == "evading_velocity":
            for at in times:
                add(at, round(rng.uniform(1.0, 30.0), 2), _CARD)
        elif name == "evading_multi_location":
            # The owner pays at home (not fraud); the clone pays elsewhere > 120 s later.
            add(times[0], self._usual_amount(user), self._usual_method(user), pattern=None)
            away = self._other_city(city)
            for at in times[1:]:
                add(at, round(rng.uniform(50.0, 800.0), 2), self._usual_method(user), away)
        elif name == "evading_paypal_micro":
            for at in times:
                add(at, round(rng.uniform(1.0, PAYPAL_MICRO_AMOUNT - 0.01), 2), PAYPAL)
        else:
            raise ValueError(f"unknown scenario {name!r}")
        return events

    def _latest_pending_ms(self) -> float:
        """Latest scheduled time among pending events (-inf when none)."""
        return max((t for t, _, _ in self._pending), default=-math.inf)


def _is_night(local_ms: int) -> bool:
    hour = local_ms // _HOUR_MS % 24
    return hour >= NIGHT_FROM_HOUR or hour < NIGHT_TO_HOUR


def _gaps(rng: random.Random, count: int, low_ms: int, high_ms: int) -> list[int]:
    """Offsets of ``count`` events (first 0) with gaps drawn uniformly from [low, high] ms."""
    offsets, at = [0], 0
    for _ in range(count - 1):
        at += rng.randint(low_ms, high_ms)
        offsets.append(at)
    return offsets


def _scenario_offsets(rng: random.Random, name: str) -> list[int]:
    """Millisecond offsets (first 0, sorted) of a scenario's events. Under the default rules:

    * legit_traveller: home, then 1-2 payments away 30-210 s later (the second 25-90 s after the
      first): multi_location trips iff the gap is <= 120 s (1/2); 3 events: never velocity.
    * legit_big_ticket: 1-2 large payments, then the big one, 40-180 s apart: high_value trips
      once; gaps >= 21 s: never velocity.
    * legit_paypal_bundle, legit_shared_card: 2-5 payments; bundle gaps 21-60 s (4 span >= 63 s:
      never velocity; <= 180 s: paypal_micro iff more than 3), shared card all within 10-60 s
      (velocity iff more than 3).
    * legit_night_shift: 2-3 payments 60-180 s apart: nothing.
    * evading_velocity: 5-9 tries 21-40 s apart (any 4 span >= 63 s), one labelled run.
    * evading_multi_location: the owner's payment, then 1-2 elsewhere 130-400 s later (the
      second 20-100 s after the first).
    * evading_paypal_micro: 4-6 charges 81-120 s apart (any 4 span >= 243 s).
    """
    if name == LEGIT_TRAVELLER:
        away = rng.randint(30_000, 210_000)
        return [0, away] if rng.random() < 0.5 else [0, away, away + rng.randint(25_000, 90_000)]
    if name == LEGIT_BIG_TICKET:
        return _gaps(rng, rng.randint(2, 3), 40_000, 180_000)
    if name == LEGIT_PAYPAL_BUNDLE:
        return _gaps(rng, rng.randint(2, 5), NORMAL_MIN_GAP_MS, 60_000)
    if name == LEGIT_SHARED_CARD:
        count, span = rng.randint(2, 5), rng.randint(10_000, VELOCITY_WINDOW_MS)
        return [0, *sorted(rng.randint(0, span) for _ in range(count - 2)), span]
    if name == LEGIT_NIGHT_SHIFT:
        return _gaps(rng, rng.randint(2, 3), 60_000, 180_000)
    if name == "evading_high_value":
        return [0]
    if name == "evading_velocity":
        return _gaps(rng, rng.randint(5, 9), NORMAL_MIN_GAP_MS, 40_000)
    if name == "evading_multi_location":
        away = rng.randint(MULTI_LOCATION_WINDOW_MS + 10_000, 400_000)
        return [0, away] if rng.random() < 0.5 else [0, away, away + rng.randint(20_000, 100_000)]
    if name == "evading_paypal_micro":
        return _gaps(rng, rng.randint(4, 6), PAYPAL_MICRO_MIN_GAP_MS, 120_000)
    raise ValueError(f"unknown scenario {name!r}")


def _episode_offsets(rng: random.Random, pattern: str) -> list[int]:
    """Millisecond offsets from the episode start (first is 0, sorted) that satisfy ``pattern``
    and no other rule (velocity needs > 3 events in 60 s, so paypal_micro spreads its events
    at least 21 s apart; multi_location stays at <= 3 events)."""
    if pattern == HIGH_VALUE:
        return [0]
    if pattern == VELOCITY:
        count, span = rng.randint(4, 7), rng.randint(10_000, 50_000)
        middle = sorted(rng.randint(0, span) for _ in range(count - 2))
        return [0, *middle, span]
    if pattern == MULTI_LOCATION:
        count, span = rng.randint(2, 3), rng.randint(30_000, 100_000)
        return [0, span] if count == 2 else [0, rng.randint(0, span), span]
    if pattern == PAYPAL_MICRO:
        count = rng.randint(4, 6)
        gaps = count - 1
        floor_span = max(60_000, gaps * NORMAL_MIN_GAP_MS)
        span = rng.randint(floor_span, 200_000)
        # Each gap >= 21 s, the remaining time spread at random.
        extra = span - gaps * NORMAL_MIN_GAP_MS
        cuts = sorted(rng.randint(0, extra) for _ in range(gaps - 1))
        bounds = [0, *cuts, extra]
        offsets, at = [0], 0
        for k in range(gaps):
            at += NORMAL_MIN_GAP_MS + bounds[k + 1] - bounds[k]
            offsets.append(at)
        return offsets
    raise ValueError(f"unknown fraud pattern {pattern!r}")


def encode_transaction(tx: Transaction) -> bytes:
    """Compact JSON of a transaction made by this generator, byte-identical to
    ``json.dumps(tx, separators=(",", ":"))`` and about three times faster (the producer's hot
    path). Only for generated transactions: their strings never need escaping (hex ids, ASCII
    city names, dotted IPs, fixed codes)."""
    pattern = tx["fraud_pattern"]
    label = "null" if pattern is None else f'"{pattern}"'
    return (
        f'{{"transaction_id":"{tx["transaction_id"]}","user_id":"{tx["user_id"]}",'
        f'"amount":{tx["amount"]!r},"currency":"{tx["currency"]}",'
        f'"timestamp":"{tx["timestamp"]}","location":"{tx["location"]}",'
        f'"payment_method":"{tx["payment_method"]}","merchant_id":"{tx["merchant_id"]}",'
        f'"device_ip":"{tx["device_ip"]}","is_fraud":{"true" if tx["is_fraud"] else "false"},'
        f'"fraud_pattern":{label}}}'
    ).encode()


def iter_replay(path: Path) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) pairs for a JSON-lines replay. Each line's bytes are sent unchanged (so bad
    input can be replayed on purpose); the key is the object's ``user_id`` when the line parses
    as a JSON object with a string user_id, else None. Empty lines are skipped."""
    with open(path, "rb") as fh:
        for raw in fh:
            value = raw.rstrip(b"\r\n")
            if not value:
                continue
            key: bytes | None = None
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("user_id"), str):
                key = parsed["user_id"].encode()
            yield key, value

"""The cloud price and lifecycle data (pocketvlm/data/providers.json): reading and checking it, and what it says
about a model on the run's date.

Standard library only, like the client. Everything a user can get wrong in a providers file (missing, not JSON, a
field of the wrong type, a successor that is not in the file) is one PocketVLMError naming the file and the field.
The data decides; this module only reads it: model ids, prices, dates and image-token rules never appear here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from pocketvlm.errors import PocketVLMError

SCHEMA = "pocketvlm.providers/2"
DIALECTS = ("mistral", "openai")
PLAIN_HTTP_FLAG = "--allow-plain-http"


# ------------------------------------------------------------------------------------------------ base URLs

_URL_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: all http.client takes in a request line


def is_loopback_host(host: str) -> bool:
    """This machine: localhost, 127.0.0.0/8, ::1 (and ::ffff:127.x). A name other than localhost is not: what it
    resolves to is not known until the connection, and the key would already be on its way."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def check_base_url(url, where: str, *, allow_plain_http: bool = False) -> str:
    """URL as a provider's API base URL, or one PocketVLMError starting with WHERE (the flag, or the providers
    file's field) -- the one check every base URL goes through: flags, providers files, and the client itself.

    http(s)://host[:port]/path only: no credentials (a URL is shown and logged; the key has its own variable),
    no query or fragment, a port that exists, nothing a request line cannot carry. And plain http:// only to this
    machine: to any other host the Authorization header, the question and its images would cross the network
    unencrypted, so that needs --allow-plain-http (a server of one's own on the LAN). The URL itself is never
    echoed (it may hold a password)."""
    def bad(problem: str) -> PocketVLMError:
        return PocketVLMError(f"{where}: {problem}")

    if not isinstance(url, str) or not url.strip():
        raise bad("no URL given (want https://host[:port]/path)")
    if not _URL_CHARS.fullmatch(url):
        raise bad("the URL holds a space, a control or a non-ASCII character (percent-encode it)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad("not a usable URL (want https://host[:port]/path; a port from 1 to 65535)") from None
    if not parts.scheme:
        raise bad("no scheme: want https://host[:port]/path")
    if parts.scheme not in ("http", "https"):
        raise bad(f"{parts.scheme[:12]}:// is not supported; want https://host[:port]/path")
    if parts.username is not None or parts.password is not None:
        raise bad("the URL carries a user name or password; give the API key in the provider's environment "
                  "variable, never in the URL")
    if not parts.hostname:
        raise bad("no host in the URL (want https://host[:port]/path)")
    if port == 0:
        raise bad("port 0 is not a port to connect to (want 1 to 65535)")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise bad("a base URL takes no ?query or #fragment")
    if parts.scheme == "http" and not allow_plain_http and not is_loopback_host(parts.hostname):
        raise bad(f"http:// to {parts.hostname[:80]} would send the API key, the question and its images "
                  f"unencrypted; use https://, or pass {PLAIN_HTTP_FLAG} for a server of your own on your network")
    return url


@dataclass(frozen=True)
class ImageRule:
    """mistral-common's ImageEncoder token count for one family of vision encoders."""

    id: str
    patch: int
    max_side: int
    merge: int = 1
    basis: str = ""        # "documented (...)" or "assumed (...)": how sure the data is that this model uses it
    source: str = ""

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) of image tokens, exactly as mistral_common.tokens.tokenizers.image.ImageEncoder counts."""
        w, h = width, height
        ratio = max(w / self.max_side, h / self.max_side)
        if ratio > 1:  # round() as mistral-common does (Python's, half to even)
            # a sliver (e.g. 1 x 3080) rounds to 0 px, which mistral-common refuses (assert w > 0); count 1 px
            w, h = max(1, round(w / ratio)), max(1, round(h / ratio))
        step = self.patch * self.merge
        return (w - 1) // step + 1, (h - 1) // step + 1

    def tokens(self, width: int, height: int) -> int:
        """Image tokens in the prompt: the grid plus one [IMG_BREAK] per row (the last becomes [IMG_END])."""
        cols, rows = self.grid(width, height)
        return (cols + 1) * rows

    def describe(self) -> str:
        merge = f", merged {self.merge}x{self.merge}" if self.merge > 1 else ""
        return (f"{self.patch} px patches{merge} after fitting the longest side to {self.max_side} px, plus a break "
                f"token per row; {self.basis or 'rule ' + self.id}")


@dataclass(frozen=True)
class Provider:
    """One endpoint and one model id: what `ask` needs to call it, and the price data for that id."""

    id: str               # the --cloud name
    name: str             # the model's display name
    base_url: str
    dialect: str          # "mistral" | "openai"
    model: str            # the API model id sent
    key_env: str
    input_per_m: float    # USD per million input tokens
    output_per_m: float   # USD per million output tokens
    context: int | None
    price_date: str | None
    price_source: str
    image_tokens: dict    # {"patch", "max_side", "merge", "basis"}: the estimate's image rule
    batch_factor: float | None = None
    batch_source: str | None = None
    released: str | None = None
    deprecated: str | None = None
    retired: str | None = None
    successor: str | None = None    # model id
    lifecycle_source: str | None = None
    docs_stage: str | None = None   # the stage the provider's docs give ("General Availability", "Public Preview"...)
    disputes: tuple = ()            # one line per third-party claim the docs contradict (the data follows the docs)
    known: bool = True              # False: the model id is not in the price data (price borrowed, labelled)
    url_from: str = "the base URL"  # where base_url came from (a flag, a providers file's field), for its errors

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return prompt_tokens * self.input_per_m / 1e6 + completion_tokens * self.output_per_m / 1e6

    def image_rule(self) -> ImageRule:
        t = self.image_tokens
        return ImageRule(id=t.get("rule", ""), patch=t["patch"], max_side=t["max_side"], merge=t.get("merge", 1),
                         basis=t.get("basis", ""))

    def status(self, today: dt.date) -> str:
        """'retired', 'deprecated' or 'active' on `today`, from the data's dates (unknown dates: active)."""
        if self.retired and dt.date.fromisoformat(self.retired) <= today:
            return "retired"
        if self.deprecated and dt.date.fromisoformat(self.deprecated) <= today:
            return "deprecated"
        return "active"

    def lifecycle(self, today: dt.date) -> dict:
        return {"model": self.model, "name": self.name, "status": self.status(today), "as_of": today.isoformat(),
                "docs_stage": self.docs_stage, "released": self.released, "deprecated": self.deprecated,
                "retired": self.retired, "successor": self.successor, "source": self.lifecycle_source}


@dataclass(frozen=True)
class PricePoint:
    """A price the report shows: whose it is, why it is there, and what a query costs at it."""

    provider: Provider
    label: str            # "current price", "retired model, last price", ...

    def per_query(self, prompt_tokens: float, completion_tokens: float) -> dict:
        standard = self.provider.cost(prompt_tokens, completion_tokens)
        factor = self.provider.batch_factor
        return {"standard": standard, "batch": standard * factor if factor is not None else None}

    def to_json(self, today: dt.date) -> dict:
        p = self.provider
        return {"label": self.label, "model": p.model, "name": p.name, "status": p.status(today),
                "retired": p.retired, "input_per_m": p.input_per_m, "output_per_m": p.output_per_m,
                "batch_factor": p.batch_factor, "date": p.price_date, "source": p.price_source,
                "batch_source": p.batch_source}


@dataclass
class CloudPlan:
    """What the cloud leg does on `today`: the model the user named, the one a measured run calls, and the prices."""

    requested: Provider
    call: Provider | None            # None: retired with no callable successor in the data
    today: dt.date
    override: bool                   # --cloud-model given: sent as is, never swapped for a successor
    notes: list[str] = field(default_factory=list)   # one line each: printed on stderr and in the report
    about: str | None = None                          # the provider's own note, for the report only
    disputes: list[str] = field(default_factory=list)  # where third parties disagree with the docs: report only
    compare: list[Provider] = field(default_factory=list)   # other prices to show (e.g. Medium 3's last one)

    def prices(self, measured: bool) -> list[PricePoint]:
        """Headline first: the called model's price when measured; when estimating a retired model, its last price
        (the user asked about it), then the successor's."""
        points, seen = [], set()

        def add(p: Provider | None):
            if p is None or p.model in seen:
                return
            seen.add(p.model)
            points.append(PricePoint(p, _price_label(p, self.today)))

        order = [self.call, self.requested] if measured or self.call is None else (
            [self.requested, self.call] if self.requested.status(self.today) == "retired" else [self.call])
        for p in order + self.compare:
            add(p)
        return points


def _price_label(p: Provider, today: dt.date) -> str:
    if not p.known:
        return f"price of the provider's listed model (the id {p.model} is not in the price data)"
    status = p.status(today)
    if status == "retired":
        return "retired model, last price"
    if status == "deprecated":
        return f"current price (deprecated; retires {p.retired})" if p.retired else "current price (deprecated)"
    return "current price"


# ------------------------------------------------------------------------------------------------ reading the file

def builtin_path() -> Path:
    return Path(str(resources.files("pocketvlm").joinpath("data/providers.json")))


@lru_cache(maxsize=None)
def _builtin_text() -> str:
    return resources.files("pocketvlm").joinpath("data/providers.json").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Catalog:
    where: str
    default: str
    providers: dict           # --cloud name -> {"model", "compare_with"?, "report_note"?}
    aliases: dict             # other accepted --cloud names -> name
    models: dict              # model id -> Provider built with id = "" (filled in by provider())
    api_names: dict           # every API name the data lists -> model id
    any_id: frozenset = frozenset()   # models whose price applies to whatever id is sent (a local endpoint)


def _bad(where: str, what: str) -> PocketVLMError:
    return PocketVLMError(f"providers file {where}: {what}")


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read and check a providers file (the built-in one by default); every problem is one line."""
    if path is None:
        where, text = "(built-in)", _builtin_text()
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise _bad(where, "no such file") from e
        except IsADirectoryError as e:
            raise _bad(where, "is a folder, not a JSON file") from e
        except UnicodeDecodeError as e:
            raise _bad(where, "not UTF-8 text") from e
        except OSError as e:
            raise _bad(where, f"unreadable ({e.strerror or e.__class__.__name__})") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", None)
        raise _bad(where, f"not valid JSON{f' (line {line})' if line else ''}") from e
    if not isinstance(data, dict):
        raise _bad(where, "expected a JSON object at the top")
    if "schema" not in data:
        return _from_v1(data, where)
    if data["schema"] != SCHEMA:
        raise _bad(where, f"schema {str(data['schema'])[:40]!r} is not {SCHEMA!r}; start from a copy of "
                          f"{builtin_path()}")
    return _from_v2(data, where)


class _Fields:
    """Typed access to one JSON object, with the path of every field in the error."""

    def __init__(self, obj, where: str, path: str):
        if not isinstance(obj, dict):
            raise _bad(where, f"{path or 'the top level'} must be an object")
        self.obj, self.where, self.path = obj, where, path

    def _name(self, key) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def _fail(self, key, expected):
        return _bad(self.where, f"{self._name(key)} must be {expected}")

    def get(self, key, *, optional=False):
        if key not in self.obj or self.obj[key] is None:
            if optional:
                return None
            raise _bad(self.where, f"{self._name(key)} is missing")
        return self.obj[key]

    def text(self, key, *, optional=False) -> str | None:
        value = self.get(key, optional=optional)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self._fail(key, "a non-empty string")
        return value

    def number(self, key, *, optional=False, positive=False) -> float | None:
        value = self.get(key, optional=optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self._fail(key, "a number >= 0")
        if positive and value <= 0:
            raise self._fail(key, "a number > 0")
        return float(value)

    def whole(self, key, *, optional=False) -> int | None:
        value = self.get(key, optional=optional)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise self._fail(key, "a whole number >= 1")
        return value

    def date(self, key) -> str | None:
        value = self.get(key, optional=True)
        if value is None:
            return None
        try:
            dt.date.fromisoformat(value)
        except (TypeError, ValueError) as e:
            raise self._fail(key, "a date YYYY-MM-DD or null") from e
        return value

    def names(self, key) -> list[str]:
        value = self.get(key, optional=True) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._fail(key, "a list of strings")
        return value

    def sub(self, key, *, optional=False) -> _Fields | None:
        value = self.get(key, optional=optional)
        return None if value is None else _Fields(value, self.where, self._name(key))


def describe_source(src) -> str:
    """One readable line for a source object (or a list of them)."""
    if src is None:
        return "source unknown"
    if isinstance(src, list):
        return "; ".join(describe_source(s) for s in src)
    if isinstance(src, str):
        return src
    if not isinstance(src, dict):
        return "source unknown"
    if src.get("repo"):
        at = f" @{str(src['commit'])[:12]}" if src.get("commit") else ""
        changed = f", changed {src['changed']}" if src.get("changed") else ""
        stated = f", dated {src['stated']}" if src.get("stated") else ""  # the date the file itself gives
        return f"{src['repo']}/{src.get('path', '')}{at}{changed}{stated}"
    if src.get("url"):
        when = src.get("date") or (f"read {src['read']}" if src.get("read") else None)
        return f"{src['url']}" + (f" ({when})" if when else "")
    return str(src.get("note") or "source unknown")


def _image_rules(data: _Fields) -> dict[str, dict]:
    rules = {}
    table = data.sub("image_token_rules")
    for rule_id in table.obj:
        r = table.sub(rule_id)
        rules[rule_id] = {"rule": rule_id, "patch": int(r.whole("patch")), "max_side": int(r.whole("max_side")),
                          "merge": int(r.whole("merge", optional=True) or 1),
                          "source": describe_source(r.get("source", optional=True))}
    return rules


def _disputes(m: _Fields, name: str) -> tuple[str, ...]:
    """models.X.third_party: each claim a third party makes that the provider's own docs do not, as one line that
    names both sides (the data itself follows the docs)."""
    claims = m.get("third_party", optional=True) or []
    if not isinstance(claims, list):
        raise m._fail("third_party", "a list of {claim, docs_say, source} objects")
    lines = []
    for i, claim in enumerate(claims):
        c = _Fields(claim, m.where, f"{m._name('third_party')}[{i}]")
        lines.append(f"{name}: {c.text('claim')} (third party: {describe_source(c.get('source'))}); the provider's "
                     f"docs: {c.text('docs_say')}")
    return tuple(lines)


def _from_v2(raw: dict, where: str) -> Catalog:
    data = _Fields(raw, where, "")
    rules = _image_rules(data)
    endpoints = {}
    table = data.sub("endpoints")
    for name in table.obj:
        e = table.sub(name)
        dialect = e.text("dialect")
        if dialect not in DIALECTS:
            raise _bad(where, f"endpoints.{name}.dialect must be one of {', '.join(DIALECTS)}")
        batch = e.sub("batch", optional=True)
        url_from = f"providers file {where}: endpoints.{name}.base_url"
        # the form is checked here; whether plain http is allowed, when the URL is about to be called (plan_cloud)
        base_url = check_base_url(e.text("base_url"), url_from, allow_plain_http=True)
        endpoints[name] = {"base_url": base_url, "url_from": url_from, "dialect": dialect,
                           "key_env": e.text("key_env"),
                           "batch_factor": batch.number("factor", positive=True) if batch else None,
                           "batch_source": describe_source(batch.get("source", optional=True)) if batch else None}
    models, api_names, any_id = {}, {}, set()
    table = data.sub("models")
    for model_id in table.obj:
        m = table.sub(model_id)
        endpoint = m.text("endpoint")
        if endpoint not in endpoints:
            raise _bad(where, f"models.{model_id}.endpoint {endpoint!r} is not in endpoints")
        price = m.sub("price")
        image = m.sub("image_tokens")
        rule = image.text("rule")
        if rule not in rules:
            raise _bad(where, f"models.{model_id}.image_tokens.rule {rule!r} is not in image_token_rules")
        context = m.sub("context", optional=True)
        e = endpoints[endpoint]
        models[model_id] = Provider(
            id="", name=m.text("name"), base_url=e["base_url"], url_from=e["url_from"], dialect=e["dialect"],
            model=model_id,
            key_env=e["key_env"], input_per_m=price.number("input_per_m"), output_per_m=price.number("output_per_m"),
            context=context.whole("tokens", optional=True) if context else None,
            price_date=price.date("as_of"), price_source=describe_source(price.get("source", optional=True)),
            image_tokens={**rules[rule], "basis": image.text("basis", optional=True) or ""},
            batch_factor=e["batch_factor"], batch_source=e["batch_source"],
            released=m.date("released"), deprecated=m.date("deprecated"), retired=m.date("retired"),
            successor=m.text("successor", optional=True),
            lifecycle_source=describe_source(m.get("lifecycle_source", optional=True)),
            docs_stage=m.text("docs_stage", optional=True), disputes=_disputes(m, m.text("name")))
        for name in [model_id, *m.names("api_names")]:
            api_names.setdefault(name, model_id)
        any_flag = m.get("any_id", optional=True)
        if any_flag not in (None, True, False):
            raise _bad(where, f"models.{model_id}.any_id must be true or false")
        if any_flag:
            any_id.add(model_id)
    for model_id, p in models.items():
        if p.successor and p.successor not in models:
            raise _bad(where, f"models.{model_id}.successor {p.successor!r} is not in models")
    providers, aliases = {}, {}
    table = data.sub("providers")
    for name in table.obj:
        entry = table.sub(name)
        model = entry.text("model")
        compare = entry.text("compare_with", optional=True)
        for key, value in (("model", model), ("compare_with", compare)):
            if value is not None and value not in models:
                raise _bad(where, f"providers.{name}.{key} {value!r} is not in models")
        providers[name] = {"model": model, "compare_with": compare,
                           "report_note": entry.text("report_note", optional=True)}
        for alias in entry.names("aliases"):
            aliases[alias] = name
    default = data.text("default")
    if default not in providers:
        raise _bad(where, f"default {default!r} is not in providers")
    return Catalog(where=where, default=default, providers=providers, aliases=aliases, models=models,
                   api_names=api_names, any_id=frozenset(any_id))


def _from_v1(raw: dict, where: str) -> Catalog:
    """A providers file from before lifecycle data (no "schema"): one flat entry per provider. Still read, so a
    copy a user priced by hand keeps working; its models have no lifecycle dates."""
    providers, models = {}, {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        f = _Fields(entry, where, name)
        dialect = f.text("dialect")
        if dialect not in DIALECTS:
            raise _bad(where, f"{name}.dialect must be one of {', '.join(DIALECTS)}")
        image = f.sub("image_tokens")
        model_id = f.text("model")
        url_from = f"providers file {where}: {name}.base_url"
        models[model_id] = Provider(
            id="", name=f.text("name"), base_url=check_base_url(f.text("base_url"), url_from, allow_plain_http=True),
            url_from=url_from, dialect=dialect, model=model_id,
            key_env=f.text("key_env"), input_per_m=f.number("input_per_m"), output_per_m=f.number("output_per_m"),
            context=f.whole("context", optional=True), price_date=f.date("price_date"),
            price_source=f.text("price_source", optional=True) or "source unknown",
            image_tokens={"rule": "", "patch": int(image.whole("patch")), "max_side": int(image.whole("max_side")),
                          "merge": int(image.whole("merge", optional=True) or 1), "basis": "from the providers file"})
        providers[name] = {"model": model_id, "compare_with": None, "report_note": None}
    if not providers:
        raise _bad(where, f"no providers in it (expected schema {SCHEMA!r}; see {builtin_path()})")
    # v1 had no way to say a price is per model id, so any --cloud-model keeps its provider's price, as before
    return Catalog(where=where, default=next(iter(providers)), providers=providers, aliases={}, models=models,
                   api_names={m: m for m in models}, any_id=frozenset(models))


# ------------------------------------------------------------------------------------------------ what to call

def default_provider(path: Path | str | None = None) -> str:
    """The --cloud name used when none is given: the data's "default"."""
    return load_catalog(path).default


def cloud_help(path: Path | str | None = None, today: dt.date | None = None) -> str:
    """The providers a --cloud flag takes, as the data says on `today` (default: the run's date, UTC): the default
    first, each with its model, the stage its docs give and, once retired, where a measured run goes instead."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    catalog = load_catalog(path)
    parts = []
    for name in sorted(catalog.providers, key=lambda n: n != catalog.default):  # the default first, then file order
        p = _resolve(catalog, name)
        status = p.status(today)
        about = [p.name] + ([p.docs_stage] if status == "active" and p.docs_stage else [])
        if status == "retired":
            after = _callable_successor(catalog, p, today, None, "")
            about.append(f"retired {p.retired}: estimated at its last price, measured on "
                         + (after.name if after else "nothing (no callable successor in the data)"))
        elif status == "deprecated":
            about.append(f"deprecated since {p.deprecated}" + (f", retires {p.retired}" if p.retired else ""))
        parts.append(f"{name} ({'default: ' if name == catalog.default else ''}{', '.join(about)})")
    return "provider from the price data: " + "; ".join(parts)


def load_providers(path: Path | str | None = None) -> dict[str, Provider]:
    catalog = load_catalog(path)
    return {name: _resolve(catalog, name) for name in catalog.providers}


def _resolve(catalog: Catalog, name: str) -> Provider:
    return replace(catalog.models[catalog.providers[name]["model"]], id=name)


def _provider_name(catalog: Catalog, name: str | None) -> str:
    if name in (None, "", "default"):
        return catalog.default
    name = catalog.aliases.get(name, name)
    if name not in catalog.providers:
        choices = ", ".join(sorted(catalog.providers))
        raise PocketVLMError(f"unknown cloud provider {name!r}; choose one of: {choices} (or 'none')")
    return name


def get_provider(name: str | None, *, path: Path | str | None = None, model: str | None = None,
                 base_url: str | None = None, base_url_flag: str = "--cloud-base-url") -> Provider:
    """The provider `name` (a --cloud name; None or 'default': the data's default), with --cloud-model and
    --cloud-base-url applied. An overriding model id found in the data brings its own price and lifecycle. The
    URL is not checked here (plan_cloud and the client check it)."""
    catalog = load_catalog(path)
    return _with_overrides(catalog, _provider_name(catalog, name), model, base_url, base_url_flag)


def _with_overrides(catalog: Catalog, name: str, model: str | None, base_url: str | None,
                    base_url_flag: str) -> Provider:
    p = _resolve(catalog, name)
    if model and model != p.model:
        known = catalog.api_names.get(model)
        if known is not None:
            p = replace(catalog.models[known], id=name, model=model)
        elif p.model in catalog.any_id:
            p = replace(p, model=model)
        else:  # an id the data does not know: the listed model's price, labelled so wherever it is shown
            p = replace(p, model=model, known=False, released=None, deprecated=None, retired=None, successor=None,
                        lifecycle_source=None, docs_stage=None, disputes=())
    return replace(p, base_url=base_url, url_from=base_url_flag) if base_url is not None else p


def plan_cloud(name: str | None, *, path: Path | str | None = None, model: str | None = None,
               base_url: str | None = None, today: dt.date | None = None, allow_plain_http: bool = False,
               base_url_flag: str = "--cloud-base-url") -> CloudPlan:
    """What the cloud leg does on `today` (default: the run's own date, UTC). The URL it would call is checked
    (check_base_url, under the flag or the providers file's field it came from) before anything is called."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if base_url is not None:
        check_base_url(base_url, base_url_flag, allow_plain_http=allow_plain_http)
    catalog = load_catalog(path)
    name = _provider_name(catalog, name)
    requested = _with_overrides(catalog, name, model, base_url, base_url_flag)
    entry = catalog.providers[name]
    plan = CloudPlan(requested=requested, call=requested, today=today, override=bool(model))
    status = requested.status(today)
    if entry.get("report_note") and not model:
        plan.about = entry["report_note"]
    if status == "retired":
        if model:
            plan.notes.append(f"--cloud-model {model}: the price data says {requested.name} was retired on "
                              f"{requested.retired}; sending it as asked")
        else:
            plan.call = _callable_successor(catalog, requested, today, base_url, base_url_flag)
            if plan.call is None:
                plan.notes.append(f"{requested.name} ({requested.model}) was retired on {requested.retired} and the "
                                  f"price data names no callable successor; pass --cloud-model with a current id")
            else:
                plan.call = replace(plan.call, id=name)
                plan.notes.append(f"{requested.name} ({requested.model}) was retired on {requested.retired}; a "
                                  f"measured run goes to its successor {plan.call.name} ({plan.call.model})")
    elif status == "deprecated":
        plan.notes.append(f"{requested.name} ({requested.model}) is deprecated since {requested.deprecated}"
                          + (f" and retires on {requested.retired}" if requested.retired else ""))
    if not requested.known:
        plan.notes.append(f"--cloud-model {model} is not in the price data: its cost uses the price of "
                          f"{_resolve(catalog, name).name} ({_resolve(catalog, name).model})")
    compare = entry.get("compare_with")
    if compare:
        plan.compare.append(replace(catalog.models[compare], id=name))
    for p in (requested, plan.call):
        plan.disputes += [d for d in (p.disputes if p else ()) if d not in plan.disputes]
    if plan.call is not None:  # a providers file's URL too: plain http to another host only when allowed
        check_base_url(plan.call.base_url, plan.call.url_from, allow_plain_http=allow_plain_http)
    return plan


def _callable_successor(catalog: Catalog, p: Provider, today: dt.date, base_url: str | None,
                        base_url_flag: str) -> Provider | None:
    seen = {p.model}
    while p.successor and p.successor not in seen:
        p = catalog.models[p.successor]
        seen.add(p.model)
        if p.status(today) != "retired":
            return replace(p, base_url=base_url, url_from=base_url_flag) if base_url is not None else p
    return None

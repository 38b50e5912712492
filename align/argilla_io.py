"""Argilla SDK side of the human-feedback loop: datasets, records, annotators, raw ranks.

Runs in the project venv with the `argilla` 2.8 SDK. The server is either the one
named by ARGILLA_API_URL / ARGILLA_API_KEY (the SDK's own convention) or the
local one started by `make argilla`, whose URL and owner credentials are in
`.argilla/credentials.json` (ARGILLA_LOCAL_HOME overrides the folder). API keys
are never printed or logged here.

Ranking datasets (candidates stage -> annotators -> reward model):
- `create_ranking_dataset`: fields `prompt`, `candidate_1..k`; a required
  RankingQuestion `ranking` (rank 1 = best, ties allowed), an optional 1-5
  RatingQuestion `best_quality` and an optional TextQuestion `comment`.
- `push_candidates`: candidate order shuffled per record, seeded by prompt_id
  (against position bias); the shuffle is kept in the record's metadata
  (`candidate_order`: position j shows candidate number order[j]); record ids
  are the prompt ids, so pushing again updates and never duplicates.
- `pull_rankings`: submitted responses only, raw ranks, mapped back to the
  original candidate order; invalid ones are reported, not returned.

Blind A/B datasets of the compare stage live in `align.ab_test`, built on the
helpers here (`ensure_workspace`, `upsert_records`, `iter_raw_records`, ...).

Over 450 lines because it is the whole SDK boundary: the SDK drops ranks and
suggestion ties, so the raw REST reads and the patches that work around it sit
next to the calls they fix (annotators and status share the same connection code).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from align.errors import AlignError


REPO = Path(__file__).resolve().parents[1]
RANKING = "ranking"
RATING = "best_quality"
COMMENT = "comment"
SUGGESTION_AGENT = "reward-model"
PAGE = 500  # records per request when reading (server maximum is 1000)

DEFAULT_RANKING_GUIDELINES = """\
You see one conversation and several candidate replies from an assistant.

1. Read the conversation and every reply.
2. **Rank** the replies: 1 = best. Replies that are equally good get the same rank.
   Judge helpfulness first, then correctness and safety, then style. Length alone is no merit.
3. Optionally rate how good the best reply is (1-5) and leave a comment.
4. **Submit**. Use **Discard** only when the conversation itself is broken or you cannot judge it.

The replies are shown in a random order that differs from record to record.
"""


# ---------------------------------------------------------------- connection


class ArgillaUnavailable(AlignError):
    """No Argilla server configured or reachable."""


RETRY_WAITS_S = (1.0, 2.0, 4.0)  # bounded: 4 attempts over ~7 s, then one line naming the server


def _transient(error: BaseException) -> bool:
    """A connection that failed or timed out, or a 5xx: worth asking again (a 4xx is not)."""
    import httpx

    seen = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        if getattr(seen, "status_code", None) is not None and int(seen.status_code) >= 500:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(what: str, url: str, call: Callable[[], Any], waits: Sequence[float] = RETRY_WAITS_S,
             say: Callable[[str], None] | None = None):
    """`call()`, asked again after a transient server error, `waits` seconds apart; after the last
    attempt an ArgillaUnavailable naming the server. Safe around pushes: records are upserted by
    their id (the prompt or pair id), so a push that is repeated, here or by rerunning the command,
    adds no duplicates. A pull reads everything before its stage writes anything."""
    import time

    say = say or (lambda line: print(line, flush=True))
    for attempt in range(len(waits) + 1):
        try:
            return call()
        except Exception as error:
            if not _transient(error):
                raise
            if attempt == len(waits):
                raise ArgillaUnavailable(
                    f"Argilla at {url} did not answer while {what} ({attempt + 1} attempts over "
                    f"{sum(waits):.0f} s; last: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}); "
                    "is it running (`make argilla-status`, `make argilla`)? Then run the same command again: "
                    "a push adds no duplicates") from error
            say(f"[argilla] {what}: {type(error).__name__}; asking {url} again in {waits[attempt]:.0f} s "
                f"({attempt + 1}/{len(waits)})")
            time.sleep(waits[attempt])


def local_home() -> Path:
    return Path(os.environ.get("ARGILLA_LOCAL_HOME") or REPO / ".argilla")


def local_credentials(home: Path | None = None) -> dict | None:
    """The local server's {"username", "password", "api_key", "api_url"}, or None."""
    path = (home or local_home()) / "credentials.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ArgillaUnavailable(f"{path}: unreadable ({e.__class__.__name__}); delete it and run `make argilla`")


def connect(api_url: str | None = None, api_key: str | None = None, timeout: int = 60):
    """An `rg.Argilla` client: arguments, else ARGILLA_API_URL/ARGILLA_API_KEY, else the local server."""
    import argilla as rg

    url = api_url or os.environ.get("ARGILLA_API_URL")
    key = api_key or os.environ.get("ARGILLA_API_KEY")
    source = "ARGILLA_API_URL/ARGILLA_API_KEY"
    if not (url and key):
        creds = local_credentials()
        if creds is None:
            raise ArgillaUnavailable(
                "no Argilla server configured: set ARGILLA_API_URL and ARGILLA_API_KEY, "
                "or start the local one with `make argilla`"
            )
        url, key = url or creds.get("api_url"), key or creds["api_key"]
        source = str(local_home() / "credentials.json")
        if not url:
            raise ArgillaUnavailable(f"{source} has no api_url: start the server with `make argilla`")
    try:
        return rg.Argilla(api_url=url, api_key=key, timeout=timeout)
    except Exception as e:  # the SDK raises several types; none of their messages holds the key
        raise ArgillaUnavailable(
            f"cannot reach Argilla at {url} with the key from {source}: {e.__class__.__name__}: {e}. "
            "Is it running (`make argilla`)?"
        ) from e


def _get(client, path: str, **params) -> Any:
    """A raw GET through the SDK's authenticated httpx client."""
    response = client.http_client.get(path, params=params)
    response.raise_for_status()
    return response.json()


def quiet_lookup(lookup: Callable, **kwargs):
    """An SDK lookup (workspace, dataset, user by name) without its UserWarning when absent."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lookup(**kwargs)


def ensure_workspace(client, name: str, create: bool = True):
    import argilla as rg

    ws = quiet_lookup(client.workspaces, name=name)
    if ws is None:
        if not create:
            raise AlignError(f"Argilla workspace {name!r} does not exist")
        ws = rg.Workspace(name=name, client=client).create()
    return ws


def find_dataset(client, name: str, workspace: str):
    ds = quiet_lookup(client.datasets, name=name, workspace=workspace)
    if ds is None:
        raise AlignError(f"Argilla dataset {name!r} not found in workspace {workspace!r}")
    return ds


# ---------------------------------------------------------------- rendering and shuffling


ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_conversation(messages: Sequence[dict]) -> str:
    """A conversation as markdown: one bold role label per turn, turns separated by rules."""
    parts = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLE_LABELS or not isinstance(m.get("content"), str):
            raise AlignError(f"message {i}: expected {{'role': system|user|assistant, 'content': str}}, got {m!r:.80}")
        parts.append(f"**{ROLE_LABELS[role]}:**\n\n{m['content']}")
    return "\n\n---\n\n".join(parts)


def conversation_field(client):
    """The dataset field that shows a prompt: Argilla's chat field (turns as chat bubbles, roles
    kept) rather than markdown text."""
    import argilla as rg

    return rg.ChatField(name="prompt", title="Conversation", use_markdown=True, _client=client)


def conversation_value(dataset, messages: Sequence[dict]):
    """A prompt as its dataset's field wants it: the messages for a chat field; rendered markdown
    for a text field (datasets created before the chat field keep working)."""
    import argilla as rg

    text = render_conversation(messages)  # validates the roles and contents either way
    field = dataset.settings.fields["prompt"]
    if isinstance(field, rg.ChatField):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return text


def seeded_rng(key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def shuffle_order(prompt_id: str, k: int) -> list[int]:
    """Deterministic permutation: position j (candidate_{j+1}) shows candidate number order[j]."""
    order = list(range(k))
    seeded_rng(f"candidates:{prompt_id}").shuffle(order)
    return order


def _parse_order(value: Any, k: int) -> list[int] | None:
    try:
        order = [int(x) for x in str(value).split(",")]
    except ValueError:
        return None
    return order if sorted(order) == list(range(k)) else None


# ---------------------------------------------------------------- ranking datasets


def _candidate_names(dataset) -> list[str]:
    names = [f.name for f in dataset.settings.fields if f.name.startswith("candidate_")]
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def create_ranking_dataset(
    client,
    name: str,
    workspace: str,
    k: int,
    guidelines: str | None = None,
    min_submitted: int = 1,
    rating: bool = True,
    comment: bool = True,
):
    """The ranking dataset `name` in `workspace` (created with the workspace if missing).

    An existing dataset of that name is returned as it is when it has k candidate
    fields and the ranking question; otherwise an AlignError says what differs.
    """
    import argilla as rg

    if k < 2:
        raise AlignError(f"a ranking needs at least 2 candidates per prompt, got k={k}")
    if min_submitted < 1:
        raise AlignError(f"min_submitted must be >= 1, got {min_submitted}")
    ws = ensure_workspace(client, workspace)
    existing = quiet_lookup(client.datasets, name=name, workspace=ws.name)
    if existing is not None:
        have = _candidate_names(existing)
        if len(have) != k or existing.settings.questions[RANKING] is None:
            raise AlignError(
                f"Argilla dataset {name!r} exists with {len(have)} candidates (k={k} asked) or without a "
                f"{RANKING!r} question: choose another dataset name"
            )
        return existing

    candidates = {f"candidate_{i}": f"Response {i}" for i in range(1, k + 1)}
    fields = [conversation_field(client)]
    fields += [rg.TextField(name=n, title=t, use_markdown=True, client=client) for n, t in candidates.items()]
    questions: list = [
        rg.RankingQuestion(
            name=RANKING,
            values=candidates,
            title="Rank the responses (1 = best; equally good responses share a rank)",
            required=True,
            client=client,
        )
    ]
    if rating:
        questions.append(
            rg.RatingQuestion(
                name=RATING, values=[1, 2, 3, 4, 5], title="How good is the best response? (1-5)",
                required=False, client=client,
            )
        )
    if comment:
        questions.append(rg.TextQuestion(name=COMMENT, title="Comment (optional)", required=False, client=client))
    hidden = dict(visible_for_annotators=False, client=client)
    metadata = [
        rg.TermsMetadataProperty(name="prompt_id", title="Prompt id", **hidden),
        rg.TermsMetadataProperty(name="candidate_order", title="Shuffle (position -> candidate)", **hidden),
        rg.TermsMetadataProperty(name="checkpoint", title="Checkpoint", **hidden),
        rg.FloatMetadataProperty(name="temperature", title="Temperature", **hidden),
        rg.FloatMetadataProperty(name="top_p", title="Top-p", **hidden),
        rg.IntegerMetadataProperty(name="max_new_tokens", title="Max new tokens", **hidden),
        rg.IntegerMetadataProperty(name="prompt_chars", title="Prompt length (chars)", **hidden),
        rg.IntegerMetadataProperty(name="min_candidate_chars", title="Shortest response (chars)", **hidden),
        rg.IntegerMetadataProperty(name="max_candidate_chars", title="Longest response (chars)", **hidden),
    ]
    settings = rg.Settings(
        fields=fields,
        questions=questions,
        metadata=metadata,
        guidelines=guidelines or DEFAULT_RANKING_GUIDELINES,
        allow_extra_metadata=True,  # keeps the raw prompt messages and any other item metadata
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
    )
    return rg.Dataset(name=name, workspace=ws, settings=settings, client=client).create()


_TYPED_METADATA = {"temperature": float, "top_p": float, "max_new_tokens": int, "checkpoint": str}


def _validate_item(i: int, item: dict, k: int, seen: set) -> None:
    where = f"item {i}"
    pid = item.get("prompt_id")
    if not isinstance(pid, str) or not pid:
        raise AlignError(f"{where}: prompt_id must be a non-empty string")
    if pid in seen:
        raise AlignError(f"{where}: prompt_id {pid!r} appears twice")
    seen.add(pid)
    if not isinstance(item.get("prompt"), list) or not item["prompt"]:
        raise AlignError(f"{where} ({pid}): prompt must be a non-empty list of messages")
    cands = item.get("candidates")
    if not isinstance(cands, list) or len(cands) != k or not all(isinstance(c, str) for c in cands):
        raise AlignError(f"{where} ({pid}): candidates must be a list of {k} strings (the dataset has {k})")
    ranks = item.get("suggested_ranking")
    if ranks is not None and (
        len(ranks) != k or not all(isinstance(r, int) and 1 <= r <= k for r in ranks)
    ):
        raise AlignError(f"{where} ({pid}): suggested_ranking must be {k} integers in 1..{k} (1 = best)")


def upsert_records(client, dataset, records: list, patch: Callable[[Any, Any], None] | None = None) -> list[str]:
    """Bulk upsert `rg.Record`s in batches; `patch(record, model)` may edit the API model first."""
    ids = []
    models = []
    for record in records:
        record.dataset = dataset
        model = record.api_model()
        if patch:
            patch(record, model)
        models.append(model)
    step = client.api.records.MAX_RECORDS_PER_UPSERT_BULK
    for start in range(0, len(models), step):
        done, _ = client.api.records.bulk_upsert(dataset_id=dataset.id, records=models[start : start + step])
        ids += [m.external_id for m in done]
    return ids


def push_candidates(dataset, items: Iterable[dict], agent: str = SUGGESTION_AGENT) -> list[str]:
    """Upsert one record per prompt; returns the record ids (= prompt ids).

    item: {"prompt_id", "prompt": [messages], "candidates": [texts], "metadata": {...},
    "suggested_ranking": [rank of each candidate, 1 = best] | None}.
    """
    import argilla as rg

    client = dataset._client  # the SDK has no public accessor for a resource's client
    names = _candidate_names(dataset)
    k = len(names)
    items = list(items)
    seen: set = set()
    for i, item in enumerate(items):
        _validate_item(i, item, k, seen)
    if not items:
        return []

    records, suggested = [], {}
    for item in items:
        pid, cands = item["prompt_id"], item["candidates"]
        order = shuffle_order(pid, k)
        fields = {"prompt": conversation_value(dataset, item["prompt"])}
        fields.update({names[j]: cands[order[j]] for j in range(k)})
        meta = dict(item.get("metadata") or {})
        for key, cast in _TYPED_METADATA.items():
            if meta.get(key) is not None:
                meta[key] = cast(meta[key])
        meta.update(
            prompt_id=pid,
            candidate_order=",".join(map(str, order)),
            prompt_chars=sum(len(m["content"]) for m in item["prompt"]),
            min_candidate_chars=min(map(len, cands)),
            max_candidate_chars=max(map(len, cands)),
            prompt_messages=item["prompt"],
        )
        suggestions = []
        if item.get("suggested_ranking"):
            ranks = item["suggested_ranking"]
            # The SDK writes ranking suggestions as option order without ranks (no ties);
            # the model value is patched below to carry the real ranks.
            by_rank = sorted(range(k), key=lambda j: ranks[order[j]])
            suggestions.append(rg.Suggestion(RANKING, [names[j] for j in by_rank], agent=agent, type="model"))
            suggested[pid] = [{"value": names[j], "rank": ranks[order[j]]} for j in by_rank]
        records.append(rg.Record(id=pid, fields=fields, metadata=meta, suggestions=suggestions, _dataset=dataset))

    def patch(record, model) -> None:
        for s in model.suggestions or []:
            if s.question_name == RANKING and record.id in suggested:
                s.value = suggested[record.id]

    return upsert_records(client, dataset, records, patch)


def iter_raw_records(client, dataset) -> Iterable[dict]:
    """All records with all users' responses, as the REST API returns them.

    Hand-written: the SDK's record/response models drop the ranks of a ranking
    answer and the response timestamps, so this reads
    GET /api/v1/datasets/{id}/records?include=responses directly.
    """
    offset = 0
    while True:
        page = _get(client, f"/api/v1/datasets/{dataset.id}/records", include=["responses"], offset=offset, limit=PAGE)
        items = page.get("items", [])
        yield from items
        offset += len(items)
        total = page.get("total")  # optional in the server's schema
        if len(items) < PAGE or (total is not None and offset >= total):
            return


def usernames_by_id(client) -> dict[str, str]:
    return {str(u.id): u.username for u in client.users}


def provenance(dataset, record_id: str, response: dict) -> dict:
    """Where a pulled answer came from: dataset, record, annotator, time."""
    return {
        "dataset": dataset.name,
        "record_id": record_id,
        "annotator_id": str(response.get("user_id")),
        "submitted_at": response.get("updated_at") or response.get("inserted_at"),
    }


class Pulled(list):
    """A list of pulled rows with `.problems`: [{"record_id", "annotator", "problem"}]."""

    def __init__(self, rows=(), problems=()):
        super().__init__(rows)
        self.problems = list(problems)


def _check_ranking(value: Any, names: list[str]) -> tuple[dict[str, int] | None, str | None]:
    if not isinstance(value, list):
        return None, f"ranking is {type(value).__name__}, not a list"
    ranks: dict[str, int] = {}
    for item in value:
        name, rank = (item.get("value"), item.get("rank")) if isinstance(item, dict) else (None, None)
        if name not in names:
            return None, f"unknown option {name!r}"
        if name in ranks:
            return None, f"{name} ranked twice"
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= len(names):
            return None, f"{name} has rank {rank!r}, expected an integer in 1..{len(names)}"
        ranks[name] = rank
    missing = [n for n in names if n not in ranks]
    if missing:
        return None, f"not ranked: {', '.join(missing)}"
    return ranks, None


def pull_rankings(client, dataset_name: str, workspace: str) -> Pulled:
    """Submitted rankings, one row per annotator per record, in the project format.

    Row: {"prompt_id", "prompt": [messages], "responses": [{"text", "rank"}] (original
    candidate order), "annotator", "provenance": {"dataset", "record_id",
    "annotator_id", "submitted_at"}}. Draft and discarded responses are skipped;
    invalid rankings go to `.problems` instead of the rows.
    """
    dataset = find_dataset(client, dataset_name, workspace)
    names = _candidate_names(dataset)
    k = len(names)
    users = usernames_by_id(client)
    rows, problems = [], []
    for rec in iter_raw_records(client, dataset):
        record_id = rec.get("external_id") or rec["id"]
        submitted = [r for r in rec.get("responses") or [] if r.get("status") == "submitted"]
        if not submitted:
            continue
        meta = rec.get("metadata") or {}
        order = _parse_order(meta.get("candidate_order"), k)
        prompt = meta.get("prompt_messages")
        for resp in submitted:
            annotator = users.get(str(resp.get("user_id")), str(resp.get("user_id")))

            def problem(text: str) -> None:
                problems.append({"record_id": record_id, "annotator": annotator, "problem": text})

            if order is None:
                problem(f"record metadata has no valid candidate_order for k={k}")
                continue
            if not isinstance(prompt, list):
                problem("record metadata has no prompt_messages")
                continue
            value = ((resp.get("values") or {}).get(RANKING) or {}).get("value")
            if value is None:
                problem("submitted without a ranking")
                continue
            ranks, error = _check_ranking(value, names)
            if error:
                problem(f"invalid ranking: {error}")
                continue
            responses: list[dict | None] = [None] * k
            for j, name in enumerate(names):
                responses[order[j]] = {"text": rec["fields"][name], "rank": ranks[name]}
            rows.append(
                {
                    "prompt_id": meta.get("prompt_id", record_id),
                    "prompt": prompt,
                    "responses": responses,
                    "annotator": annotator,
                    "provenance": provenance(dataset, record_id, resp),
                }
            )
    return Pulled(rows, problems)


# ---------------------------------------------------------------- annotators and status


def create_annotators(
    client, workspace: str, usernames: Iterable[str], out: Callable[[str], None] = print
) -> list[dict]:
    """Annotator accounts in `workspace`; returns [{"username", "created", "added", "password" | None}].

    New users get a generated password, printed once (here) and stored nowhere.
    Existing users are added to the workspace, not recreated (their password is unchanged).
    """
    import argilla as rg

    ws = ensure_workspace(client, workspace)
    members = {u.username for u in ws.users}
    result = []
    for username in usernames:
        username = username.strip()
        if not username:
            continue
        user = quiet_lookup(client.users, username=username)
        password = None
        if user is None:
            password = secrets.token_urlsafe(9)  # 12 characters
            try:
                user = rg.User(username=username, password=password, role="annotator", client=client).create()
            except Exception as e:
                raise AlignError(f"cannot create Argilla user {username!r}: {e}") from e
        added = username not in members
        if added:
            ws.add_user(user)
            members.add(username)
        result.append({"username": username, "created": password is not None, "added": added, "password": password})

    url = client.api_url.rstrip("/")
    out(f"Sign in at {url} (workspace {workspace!r}):")
    for r in result:
        if r["created"]:
            out(f"  {r['username']:<20} password: {r['password']}   (new; shown only now)")
        else:
            where = "added to the workspace" if r["added"] else "already in the workspace"
            out(f"  {r['username']:<20} existing user, password unchanged; {where}")
    return result


def dataset_status(client) -> list[dict]:
    """Per dataset: {"workspace", "dataset", "records": {"total", "completed", "pending"},
    "annotators": {username: {"submitted", "discarded", "draft"}}}.

    `completed` records have reached the dataset's min_submitted; the annotator
    counts add completed and pending records.
    """
    rows = []
    for ws in client.workspaces:
        for ds in ws.datasets:
            progress = ds.progress(with_users_distribution=True)
            annotators = {}
            for user, dist in (progress.get("users") or {}).items():
                counts = {s: 0 for s in ("submitted", "discarded", "draft")}
                for part in ("completed", "pending"):
                    for s in counts:
                        counts[s] += int((dist.get(part) or {}).get(s) or 0)
                annotators[user] = counts
            rows.append(
                {
                    "workspace": ws.name,
                    "dataset": ds.name,
                    "records": {key: int(progress.get(key) or 0) for key in ("total", "completed", "pending")},
                    "annotators": annotators,
                }
            )
    return rows

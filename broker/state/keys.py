"""Every Redis key in one place.

Three kinds of hash tag lay a deployment out over Redis Cluster's slots:

- `{namespace}` (`Keys`): what every replica shares and rarely writes: where each site is, API tokens, the
  site registry;
- `{namespace:j<i>}` (`ShardKeys`, `shard_tag`), one per job shard (`shards` of them; with one, its tag is
  `{namespace}` itself): the jobs and holds of the tenants that hash to it, with their histories, the tenants' queues,
  usage and limits, the shard's share of the sites' reliability, its outbox and its event log;
- `{namespace.hub}` (`HubKeys`), one per hub: its sites, their capacity, the ledger of who holds which of
  their devices, their heartbeats and the hub's change log, the site shard of that hub. Ingest, the
  heaviest write load, touches only these, so it spreads over the shards with the hubs.

A tenant's job shard is a hash of its name (`shard_index`); a job's or a hold's id ends with its shard's
number when there is more than one (`.3`), so every step on it finds its keys from the id alone. Each Lua
script touches one tag. What changes a job shard and a site shard (an allocation, a release) is a fenced
two-step protocol (broker.state.ledger). On one Redis the tags are only names.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot


@dataclass(frozen=True)
class Keys:
    namespace: str = "sw"
    shards: int = 1  # job shards; fixed for a deployment's life (a tenant's shard is a hash of its name)
    _shards: tuple[ShardKeys, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"job shards must be at least 1, not {self.shards}")
        shards = tuple(ShardKeys(self.namespace, i, self.shards, shard_tag(self.namespace, i, self.shards))
                       for i in range(self.shards))  # fmt: skip
        object.__setattr__(self, "_shards", shards)

    # job shards ----------------------------------------------------------------------------------
    def shard(self, index: int) -> ShardKeys:
        return self._shards[index]

    @property
    def each_shard(self) -> tuple[ShardKeys, ...]:
        return self._shards

    def shard_index(self, tenant: str) -> int:
        """The job shard of a tenant's jobs, holds, queue and usage."""
        return zlib.crc32(tenant.encode()) % self.shards if self.shards > 1 else 0

    def for_tenant(self, tenant: str) -> ShardKeys:
        return self._shards[self.shard_index(tenant)]

    def for_id(self, id_: str) -> ShardKeys:
        """The job shard of a job or a hold, from its id (`with_shard`)."""
        return self._shards[self.id_shard(id_)]

    def for_owner(self, owner: str) -> ShardKeys:
        """The job shard of a ledger owner: a job id, or `hold:<id>`."""
        return self._shards[self.id_shard(owner.removeprefix("hold:"))]

    def for_step(self, entry: str) -> ShardKeys:
        """The job shard whose outbox holds a step (`op\thub\tsite\towner\t...`): its owner's."""
        return self.for_owner(entry.split("\t", 4)[3])

    def id_shard(self, id_: str) -> int:
        if self.shards == 1:
            return 0
        _, dot, number = id_.rpartition(".")
        return int(number) if dot and number.isdigit() and int(number) < self.shards else 0

    @property
    def only(self) -> ShardKeys:
        """The job shard of a deployment that has one."""
        if self.shards != 1:
            raise ValueError(f"{self.shards} job shards, not one")
        return self._shards[0]

    def with_shard(self, base: str, tenant: str) -> str:
        """A new job's or hold's id for `tenant`: `base` with the tenant's shard number (none with one shard)."""
        return base if self.shards == 1 else f"{base}.{self.shard_index(tenant)}"

    def with_shard_of(self, base: str, id_: str) -> str:
        """A new id on the same job shard as the job or hold `id_`."""
        return base if self.shards == 1 else f"{base}.{self.id_shard(id_)}"

    # shared --------------------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}"

    def hub(self, hub: str) -> HubKeys:
        """The keys of one hub's site shard."""
        return HubKeys(self.namespace, hub)

    @property
    def job_shards(self) -> str:
        """String: the deployment's number of job shards, recorded at its first start (StoreBase.use_layout)."""
        return f"{self.prefix}:job-shards"

    @property
    def places(self) -> str:
        """Hash: site -> `hub\tcluster`, where the site is: the registry's word for a registered site (cluster
        '' when the registry names none), else the hub it first reported. Which shard holds its keys."""
        return f"{self.prefix}:places"

    @property
    def hubs(self) -> str:
        """Set of the hubs that have sites (whose site shards the matcher and the sweeper read)."""
        return f"{self.prefix}:hubs"

    def token(self, digest: str) -> str:
        """Hash per API token, keyed by the token's SHA-256 (the token itself is never stored): id, role,
        tenant, name, created."""
        return f"{self.prefix}:token:{digest}"

    @property
    def tokens(self) -> str:
        """Hash: token id -> the token's SHA-256, to list and revoke tokens by id."""
        return f"{self.prefix}:tokens"

    def rate_bucket(self, scope: str, subject: str) -> str:
        """Hash: a token bucket (tokens, ts) of `scope` (e.g. quotes) for one subject (e.g. an API token id)."""
        return f"{self.prefix}:bucket:{scope}:{subject}"

    @property
    def site_registry(self) -> str:
        """Hash: registered site -> JSON (hub, cluster, MQTT password hash, created); its fields are the
        set of sites allowed to speak."""
        return f"{self.prefix}:site-registry"

    @property
    def mqtt_broker_account(self) -> str:
        """String: `user password-hash` of the broker's own MQTT account, for the generated password file."""
        return f"{self.prefix}:mqtt-broker-account"

    @property
    def mqtt_bridge_accounts(self) -> str:
        """Hash: hub -> JSON (password, hash) of the hub's bridge account on the core broker (`mqtt-config
        --bridge-to`); the password itself, since each run writes it into the hub's bridge.conf."""
        return f"{self.prefix}:mqtt-bridge-accounts"


def shard_tag(namespace: str, index: int, count: int) -> str:
    """Job shard `index`'s hash tag: the namespace's own with one shard; else `namespace:j<index>` with the first
    suffix (`-<n>`, none for n = 0) that puts it in the index-th of `count` equal ranges of Redis Cluster's
    16,384 slots. Masters made with even slot ranges (`redis-cli --cluster create`) then serve equal numbers
    of shards when `count` is a multiple of theirs, rather than as the hash happens to fall."""
    if count == 1:
        return namespace
    low, high = SLOTS * index // count, SLOTS * (index + 1) // count
    n = 0
    while True:
        tag = f"{namespace}:j{index}" + (f"-{n}" if n else "")
        if low <= key_slot(tag.encode()) < high:
            return tag
        n += 1


@dataclass(frozen=True)
class ShardKeys:
    """The keys of one job shard, all under its tag (`{namespace}` when it is the only one, `shard_tag`)."""

    namespace: str
    index: int
    count: int
    tag: str

    @property
    def prefix(self) -> str:
        return "{" + self.tag + "}"

    def site_reliability(self, site: str) -> str:
        """Hash: the site's decayed reliability counters (broker.model.reliability.COUNTERS) and `t`, the ms
        of their last update; kept by transition.lua, deleted by an operator's reset."""
        return f"{self.prefix}:site:{site}:rel"

    @property
    def sites(self) -> str:
        """Sorted set: site -> change version, for changes made on the job shard (a site's reliability); the
        matcher follows it with the hubs' own change logs."""
        return f"{self.prefix}:sites"

    @property
    def clock(self) -> str:
        """Counter that orders the job shard's site changes."""
        return f"{self.prefix}:clock"

    @property
    def primary(self) -> str:
        """String: the replication id of the Redis primary the job shard last ran on (primary.lua)."""
        return f"{self.prefix}:primary"

    @property
    def wake(self) -> str:
        """Counter bumped whenever capacity may have grown on the job shard's side; the `wake` generation is
        its sum with every hub's own (`HubKeys.wake`): parked jobs older than it are looked at again."""
        return f"{self.prefix}:wake"

    @property
    def outbox(self) -> str:
        """Sorted set: a site-shard step a job-shard step decided (broker.state.ledger: `op\thub\tsite\t...`)
        -> when (ms); removed once done, done again by the sweeper when left behind."""
        return f"{self.prefix}:outbox"

    def job(self, job: str) -> str:
        return f"{self.prefix}:job:{job}"

    @property
    def queue(self) -> str:
        """Sorted set of queued jobs by priority then submission time."""
        return f"{self.prefix}:queue"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def tenant_state(self, tenant: str, state: str) -> str:
        """Sorted set: the tenant's jobs in one state, by submission time (ms); every script that changes a
        job's state moves it between these, so listing by state reads only the jobs it returns."""
        return f"{self.prefix}:tenant:{tenant}:state:{state}"

    def tenant_usage_log(self, tenant: str) -> str:
        """Stream of one tenant's usage records (the fields of `usage`), kept untrimmed: the tenant's bill,
        read by time range without touching other tenants' records."""
        return f"{self.prefix}:tenant:{tenant}:usage"

    @property
    def finished(self) -> str:
        """Sorted set: job that reached a final state -> when (ms); the sweeper archives the ones older than
        the retention."""
        return f"{self.prefix}:finished"

    def archived_job(self, job: str) -> str:
        """String: JSON {"job": the job hash, "history": its transitions, "archived": ms} of a finished job
        moved out of the hot set."""
        return f"{self.prefix}:archive:{job}"

    def tenant_queue(self, tenant: str) -> str:
        """Sorted set of one tenant's queued jobs a pass may look at, in the same order as the global queue
        (a queued job is here or in the tenant's parked set)."""
        return f"{self.prefix}:tenant:{tenant}:queue"

    def tenant_parked(self, tenant: str) -> str:
        """Sorted set: the tenant's queued jobs found unplaceable -> the `wake` generation when they were;
        out of the tenant's window until `wake` passes it."""
        return f"{self.prefix}:tenant:{tenant}:parked"

    @property
    def queue_depth(self) -> str:
        """Hash: priority -> number of queued jobs."""
        return f"{self.prefix}:queue-depth"

    @property
    def queued_tenants(self) -> str:
        """Sorted set: tenant -> number of its queued jobs (tenants with none are removed)."""
        return f"{self.prefix}:queued-tenants"

    @property
    def tenant_usage(self) -> str:
        """Hash: tenant -> devices it holds now (assigned or running)."""
        return f"{self.prefix}:tenant-usage"

    @property
    def tenant_limits(self) -> str:
        """Hash: tenant -> most devices it may hold at once (absent: no limit)."""
        return f"{self.prefix}:tenant-limits"

    @property
    def deadlines(self) -> str:
        """Sorted set: queued job -> the time (ms) it must have started by."""
        return f"{self.prefix}:deadlines"

    def idempotency(self, tenant: str, key: str) -> str:
        """String: the job an Idempotency-Key created, with the hash of the body that created it."""
        return f"{self.prefix}:idem:{tenant}:{key}"

    def job_history(self, job: str) -> str:
        """List of the job's transitions (JSON), oldest first."""
        return f"{self.prefix}:job:{job}:history"

    @property
    def assigned(self) -> str:
        """Sorted set: assigned job -> deadline (ms) for the site's `accepted`."""
        return f"{self.prefix}:assigned"

    @property
    def usage(self) -> str:
        """Stream of usage records, one per job that ended holding devices; entry ids are end times (ms).
        Trimmed to the usage retention (the tenant's own stream, `tenant_usage_log`, is not)."""
        return f"{self.prefix}:usage"

    def hold(self, hold: str) -> str:
        """Hash: a quote's devices reserved at its price until `expires` (ms): state (held, used, expired,
        released), tenant, site, hub, model, arch, count, price, latency_ms, created, expires, resources (the
        hash of the quoted job's resources and origin), offer (JSON: the quoted candidate), job (once used),
        for (the job a preemption holds the devices for), ended; kept a day after it ends."""
        return f"{self.prefix}:hold:{hold}"

    @property
    def holds(self) -> str:
        """Sorted set: standing hold -> when it expires (ms), for the sweeper."""
        return f"{self.prefix}:holds"

    def tenant_holds(self, tenant: str) -> str:
        """Sorted set: the tenant's standing holds -> when they expire (ms)."""
        return f"{self.prefix}:tenant:{tenant}:holds"

    def submit_bucket(self, token_id: str) -> str:
        """Hash: the token bucket (tokens, ts) that rate-limits one API token's submissions."""
        return f"{self.prefix}:bucket:{token_id}"

    @property
    def events(self) -> str:
        """Stream: every allocation, release and job state change."""
        return f"{self.prefix}:events"


@dataclass(frozen=True)
class HubKeys:
    """The keys of one hub's site shard, all under the tag `{namespace.hub}`."""

    namespace: str
    hub_id: str

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "." + self.hub_id + "}"

    def site(self, site: str) -> str:
        """Hash: hub, cluster, status, seq, boot, seen, mv (meta version), meta (pools, energy, latency JSON),
        aseq (the site's assignment sequence)."""
        return f"{self.prefix}:site:{site}"

    def capacity(self, site: str) -> str:
        """Hash per site: t:<model> total, x:<model> in use outside the broker, a:<model> allocated (the sum
        of the site's ledger entries), p:<model> what the pool could hold at its last allocation."""
        return f"{self.prefix}:cap:{site}"

    def site_status_log(self, site: str) -> str:
        """List of the site's status changes (JSON: ts, status), the last 100."""
        return f"{self.prefix}:site:{site}:status-log"

    def held(self, site: str) -> str:
        """Hash, the site's ledger: owner (a job id, or `hold:<id>`) -> `attempt model count seq`, the devices
        each holds there; their sum per model is `a:<model>`."""
        return f"{self.prefix}:site:{site}:held"

    @property
    def pending(self) -> str:
        """Sorted set: `site\towner\tattempt` of a ledger entry not yet known bound on the job shard -> the end
        of its lease (ms); the sweeper settles or releases it once the lease is over."""
        return f"{self.prefix}:pending"

    @property
    def reservations(self) -> str:
        """Hash: `site\towner\tattempt` of an entry on its lease -> the id of the call that reserved it; the
        same call sent again (a reply lost) gets the same reservation, any other is refused it."""
        return f"{self.prefix}:reservations"

    @property
    def sites(self) -> str:
        """Sorted set: site -> change version; the hub's sites and the change log the matcher follows."""
        return f"{self.prefix}:sites"

    @property
    def clock(self) -> str:
        """Counter that orders the hub's site changes."""
        return f"{self.prefix}:clock"

    @property
    def seen(self) -> str:
        """Sorted set: site -> last message time (ms), for the heartbeat check."""
        return f"{self.prefix}:seen"

    @property
    def wake(self) -> str:
        """Counter bumped whenever the hub's capacity may have grown (a release, new or larger capacity, a site
        back online); part of the `wake` generation (Keys.wake)."""
        return f"{self.prefix}:wake"

    @property
    def primary(self) -> str:
        """String: the replication id of the Redis primary the hub's shard last ran on (primary.lua)."""
        return f"{self.prefix}:primary"

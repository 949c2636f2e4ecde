"""Every Redis key in one place.

All keys of one deployment share the hash tag `{namespace}`, so each Lua script touches a single slot
and runs unchanged on Redis Cluster (the deployment then lives on one shard; sharding by hub is the
path past that, see README).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    namespace: str = "sw"

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}"

    # sites ---------------------------------------------------------------------------------------
    def site(self, site: str) -> str:
        """Hash: hub, cluster, status, seq, seen, mv (meta version), meta (pools, energy, latency JSON)."""
        return f"{self.prefix}:site:{site}"

    def capacity(self, site: str) -> str:
        """Hash per site: t:<model> total, x:<model> in use outside the broker, a:<model> allocated."""
        return f"{self.prefix}:cap:{site}"

    def site_status_log(self, site: str) -> str:
        """List of the site's status changes (JSON: ts, status), the last 100."""
        return f"{self.prefix}:site:{site}:status-log"

    def site_reliability(self, site: str) -> str:
        """Hash: the site's decayed reliability counters (broker.model.reliability.COUNTERS) and `t`, the ms
        of their last update; kept by transition.lua, deleted by an operator's reset."""
        return f"{self.prefix}:site:{site}:rel"

    def site_jobs(self, site: str) -> str:
        """Set of jobs holding capacity at the site (assigned or running)."""
        return f"{self.prefix}:site:{site}:jobs"

    @property
    def sites(self) -> str:
        """Sorted set: site -> change version; the registry and the change log the matcher follows."""
        return f"{self.prefix}:sites"

    @property
    def seen(self) -> str:
        """Sorted set: site -> last message time (ms), for the heartbeat check."""
        return f"{self.prefix}:seen"

    @property
    def primary(self) -> str:
        """String: the replication id of the Redis primary the deployment last ran on (primary.lua)."""
        return f"{self.prefix}:primary"

    @property
    def clock(self) -> str:
        """Counter that orders site changes."""
        return f"{self.prefix}:clock"

    # jobs ----------------------------------------------------------------------------------------
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
    def wake(self) -> str:
        """Counter bumped whenever capacity may have grown (a release, a site's new or larger capacity, a
        site back online): parked jobs older than it are looked at again."""
        return f"{self.prefix}:wake"

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

    # holds ---------------------------------------------------------------------------------------
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

    def site_holds(self, site: str) -> str:
        """Set of the standing holds at a site (their devices are in the site's `a:<model>` counters)."""
        return f"{self.prefix}:site:{site}:holds"

    # identities --------------------------------------------------------------------------------
    def token(self, digest: str) -> str:
        """Hash per API token, keyed by the token's SHA-256 (the token itself is never stored): id, role,
        tenant, name, created."""
        return f"{self.prefix}:token:{digest}"

    @property
    def tokens(self) -> str:
        """Hash: token id -> the token's SHA-256, to list and revoke tokens by id."""
        return f"{self.prefix}:tokens"

    def submit_bucket(self, token_id: str) -> str:
        """Hash: the token bucket (tokens, ts) that rate-limits one API token's submissions."""
        return f"{self.prefix}:bucket:{token_id}"

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

    # events --------------------------------------------------------------------------------------
    @property
    def events(self) -> str:
        """Stream: every allocation, release and job state change."""
        return f"{self.prefix}:events"

"""Running Suanwang assignments as Slurm jobs: sbatch in, squeue/scontrol to follow, scancel out.

The ledger maps (job, attempt) to the Slurm job id, so a redelivered assignment (MQTT QoS 1) does
nothing. Each Slurm job carries `--job-name=<job>` and `--comment=suanwang:<site>:<job>:<attempt>:<model>:<count>`,
so an adapter restarted while its jobs run finds them again in squeue instead of submitting twice.

Slurm state -> event: sbatch accepted -> accepted; RUNNING -> running; COMPLETED -> completed;
FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, BOOT_FAIL, DEADLINE, PREEMPTED -> failed (with Slurm's
reason and exit code); CANCELLED -> failed unless the broker asked for it (then nothing: the broker
already has the job cancelled). An sbatch refusal is a rejection with sbatch's message.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.inventory.slurm import SlurmTarget
from adapters.site import SiteLink
from adapters.sources import Output, SourceError, run_command
from common import logs
from common.protocol import Assignment, Assignments, SiteEventKind

log = logs.get("adapters.slurm")

FINISHED_MEMORY = 100_000
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"})
FAILED_STATES = frozenset({"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
                           "SPECIAL_EXIT", "REVOKED"})  # fmt: skip
COMMENT_PREFIX = "suanwang:"

CommandRunner = Callable[[Sequence[str]], Awaitable[Output]]


@dataclass
class SlurmJob:
    slurm_id: str
    job: str
    attempt: int
    model: str
    count: int
    reported: str = "accepted"  # the last event sent for it
    cancelled_by_us: bool = False
    seq: int | None = None  # the run's place in the site's assignment sequence


def gres_args(target: SlurmTarget, count: int) -> list[str]:
    """sbatch options that ask for `count` devices (or cores) of the pool."""
    if target.gres_name is None:  # a CPU pool: cores
        if count <= target.max_per_node:
            return ["--nodes=1", "--ntasks=1", f"--cpus-per-task={count}"]
        return [f"--ntasks={count}", "--cpus-per-task=1"]
    gres = f"{target.gres_name}:{target.gres_type}" if target.gres_type else target.gres_name
    if count <= target.max_per_node:
        return ["--nodes=1", f"--gres={gres}:{count}"]
    if count % target.max_per_node == 0:  # whole nodes: the usual shape of a large training job
        return [f"--nodes={count // target.max_per_node}", f"--gres={gres}:{target.max_per_node}"]
    # Uneven counts across nodes need cons_tres's job-wide --gpus (gpu GRES only).
    return [f"--gpus={target.gres_type + ':' if target.gres_type else ''}{count}"]


class SlurmExecutor:
    """Submits assignments with sbatch and reports their Slurm states back as site events."""

    def __init__(
        self, link: SiteLink, *, command: Callable[[str], str], job_command: str = "sleep {seconds}",
        time_scale: float = 1.0, workdir: str | None = None, extra_args: Sequence[str] = (),
        run: CommandRunner = run_command,
    ) -> None:  # fmt: skip
        self.link = link
        self.command = command  # client name -> path (bin_dir)
        self.job_command = job_command
        self.time_scale = time_scale
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.run = run
        self.targets: dict[str, SlurmTarget] = {}
        self.ledger: dict[tuple[str, int], SlurmJob] = {}
        self.finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._queue: asyncio.Queue[Assignment | Assignments] = asyncio.Queue()

    # ------------------------------------------------------------------ assignments in

    def on_assignments(self, batch: Assignments) -> None:
        # Queued for one worker: sbatch takes a while, and a cancel must not overtake its own run.
        if batch.reconcile:
            self._queue.put_nowait(batch)
            return
        for item in batch.assignments:
            self._queue.put_nowait(item)

    async def work(self) -> None:
        """Handle queued assignments one at a time, forever."""
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, Assignments):
                    await self._reconcile(item)
                elif item.action in ("cancel", "preempt"):  # Slurm's KillWait is the job's grace to checkpoint
                    await self._cancel(item)
                else:
                    await self._submit(item)
            except Exception:  # one bad assignment must not stop the rest
                log.exception("assignment failed", site=self.link.site,
                              job=item.job if isinstance(item, Assignment) else "")  # fmt: skip

    def _remember(self, key: tuple[str, int]) -> None:
        self.finished[key] = None
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _lost(self, key: tuple[str, int]) -> None:
        """Tell the broker this site does not hold work it counts here; a late run for it is then ignored."""
        self._remember(key)
        reason = f"site {self.link.site} does not hold it (lost in a restart, or its run has not arrived)"
        self.link.emit(key[0], key[1], SiteEventKind.LOST, reason)
        log.info("job lost", site=self.link.site, job=key[0], attempt=key[1])

    def _reject(self, key: tuple[str, int], reason: str) -> None:
        self._remember(key)
        self.link.emit(key[0], key[1], SiteEventKind.REJECTED, reason[:500])
        log.info("job rejected", site=self.link.site, job=key[0], attempt=key[1], reason=reason)

    async def _submit(self, item: Assignment) -> None:
        key = (item.job, item.attempt)
        if key in self.ledger or key in self.finished:
            return  # a redelivery of something already handled
        target = self.targets.get(item.model or "")
        if target is None:
            self._reject(key, f"model {item.model} is not offered by Slurm site {self.link.site}")
            return
        if item.count < 1:
            self._reject(key, f"count {item.count} is not a positive number of devices")
            return
        seconds = max(1, math.ceil(item.duration_hours * 3600.0 / self.time_scale))
        values = {"seconds": seconds, "hours": item.duration_hours, "job": item.job, "attempt": item.attempt,
                  "model": item.model, "count": item.count}  # fmt: skip
        output = []
        if self.workdir:
            output = [f"--chdir={self.workdir}", f"--output={Path(self.workdir) / 'suanwang-%j.out'}"]
        argv = [
            self.command("sbatch"), "--parsable", f"--job-name={item.job}",
            f"--comment={COMMENT_PREFIX}{self.link.site}:{item.job}:{item.attempt}:{item.model}:{item.count}",
            f"--time={max(1, math.ceil(seconds / 60))}",
            f"--export=ALL,SUANWANG_JOB={item.job},SUANWANG_ATTEMPT={item.attempt},SUANWANG_MODEL={item.model},"
            f"SUANWANG_COUNT={item.count},SUANWANG_SECONDS={seconds}",
            *([f"--partition={','.join(target.partitions)}"] if target.partitions else []),
            *output,
            *gres_args(target, item.count), *self.extra_args,
            f"--wrap={self.job_command.format(**values)}",
        ]  # fmt: skip
        try:
            result = await self.run(argv)
        except SourceError as exc:  # sbatch missing or hanging: say so now rather than let the broker time out
            self._reject(key, f"sbatch failed: {exc}")
            return
        slurm_id = result.stdout.strip().split(";")[0]
        if result.returncode != 0 or not slurm_id.isdigit():
            message = (result.stderr or result.stdout).strip().replace("sbatch: error: ", "")
            self._reject(key, f"sbatch refused: {message or 'no job id'}")
            return
        self.ledger[key] = SlurmJob(slurm_id, item.job, item.attempt, item.model or "", item.count, seq=item.seq)
        self.link.emit(item.job, item.attempt, SiteEventKind.ACCEPTED)
        log.info("job submitted", site=self.link.site, job=item.job, attempt=item.attempt, slurm_id=slurm_id)

    async def _cancel(self, item: Assignment) -> None:
        # A cancel for attempt N also stops older attempts of the job still held here.
        for key, job in list(self.ledger.items()):
            if key[0] == item.job and key[1] <= item.attempt and not job.cancelled_by_us:
                job.cancelled_by_us = True
                result = await self.run([self.command("scancel"), job.slurm_id])
                log.info("job cancelled", site=self.link.site, job=key[0], slurm_id=job.slurm_id,
                         ok=result.returncode == 0)  # fmt: skip
        self._remember((item.job, item.attempt))

    async def _reconcile(self, batch: Assignments) -> None:
        """Stop the Slurm jobs the broker no longer counts here (unless assigned after the list was read);
        report what it counts that this site does not hold."""
        listed = {(a.job, a.attempt) for a in batch.assignments}
        for key, job in list(self.ledger.items()):
            newer = batch.upto is not None and job.seq is not None and job.seq > batch.upto
            if key not in listed and not newer:
                await self._cancel(Assignment(job=key[0], attempt=key[1], action="cancel"))
        for key in sorted(listed):
            if key not in self.ledger and key not in self.finished:
                self._lost(key)

    # ------------------------------------------------------------------ states out

    def own_usage(self) -> dict[str, int]:
        """Devices per model that Slurm counts as in use because of our own running jobs."""
        usage: dict[str, int] = {}
        for job in self.ledger.values():
            if job.reported == "running":
                usage[job.model] = usage.get(job.model, 0) + job.count
        return usage

    async def _states(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """Slurm id -> (state, detail) from squeue (all states), then scontrol for any it no longer shows."""
        out: dict[str, tuple[str, str]] = {}
        result = await self.run([self.command("squeue"), "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
        for line in result.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 3 and parts[0] in ids:
                out[parts[0]] = (parts[1].upper(), f"reason {parts[2]}")
        for slurm_id in ids:
            if slurm_id in out:
                continue
            shown = await self.run([self.command("scontrol"), "show", "job", slurm_id, "--oneliner"])
            fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
            if "JobState" in fields:
                detail = f"reason {fields.get('Reason', '?')}, exit {fields.get('ExitCode', '?')}"
                out[slurm_id] = (fields["JobState"].upper(), detail)
            elif shown.returncode != 0 and "Invalid job id" in shown.stderr:
                out[slurm_id] = ("VANISHED", "Slurm no longer knows the job")
        return out

    async def poll(self) -> None:
        """Report every state change of our Slurm jobs since the last poll."""
        if not self.ledger:
            return
        by_id = {job.slurm_id: (key, job) for key, job in self.ledger.items()}
        states = await self._states(list(by_id))
        for slurm_id, (state, detail) in states.items():
            key, job = by_id[slurm_id]
            self._advance(key, job, state.split()[0].rstrip("+"), detail)

    def _advance(self, key: tuple[str, int], job: SlurmJob, state: str, detail: str) -> None:
        emit = self.link.emit
        if state in RUNNING_STATES and job.reported == "accepted":
            job.reported = "running"
            emit(job.job, job.attempt, SiteEventKind.RUNNING)
            return
        final = state == "COMPLETED" or state in FAILED_STATES or state in ("CANCELLED", "VANISHED")
        if not final:
            return
        del self.ledger[key]
        self._remember(key)
        if job.cancelled_by_us:
            return
        if state == "COMPLETED":
            if job.reported == "accepted":  # finished between two polls: say it ran
                emit(job.job, job.attempt, SiteEventKind.RUNNING)
            emit(job.job, job.attempt, SiteEventKind.COMPLETED)
        else:
            why = "cancelled outside Suanwang" if state == "CANCELLED" else state
            emit(job.job, job.attempt, SiteEventKind.FAILED, f"slurm job {job.slurm_id} {why} ({detail})")
        log.info("job finished", site=self.link.site, job=job.job, slurm_id=job.slurm_id, state=state)

    async def recover(self) -> None:
        """Adopt our jobs still known to Slurm (after an adapter restart), so they are not submitted twice."""
        result = await self.run([self.command("squeue"), "-h", "-o", "%i|%k|%T"])
        for line in result.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 3 or not parts[1].startswith(COMMENT_PREFIX):
                continue
            fields = parts[1][len(COMMENT_PREFIX) :].split(":")
            # Several sites may share one Slurm cluster: adopt only this site's jobs.
            if len(fields) != 5 or fields[0] != self.link.site or not fields[2].isdigit() or not fields[4].isdigit():
                continue
            key = (fields[1], int(fields[2]))
            reported = "running" if parts[2].upper() in RUNNING_STATES else "accepted"
            self.ledger[key] = SlurmJob(parts[0], key[0], key[1], fields[3], int(fields[4]), reported=reported)
            log.info("job adopted", site=self.link.site, job=key[0], attempt=key[1], slurm_id=parts[0])

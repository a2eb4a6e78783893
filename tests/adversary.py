"""A malicious swarm peer for the fault-injection tests: it joins like a volunteer, then misbehaves.

    python tests/adversary.py ADDR... --out result.json [--lie-progress] [--forge] [--serve-foreign-state]

- ``--lie-progress``: publishes a validly signed hivemind progress record claiming step 10**12, 10**15 samples
  and 10**15 samples/s, every second.
- ``--forge``: tries to overwrite a trainer's progress record, the seed's config and a trainer's donor entry, to
  list itself as another peer in the donor registry, to write hivemind's unsigned donor registry, NaN / huge /
  far-future records of its own, and signs a competing config for the same run; writes what the DHT accepted
  to ``--out`` (JSON).
- ``--serve-foreign-state``: offers a state of the right shapes but of another model (another init seed) at the
  swarm's current step, with the highest plausible priority, so joiners try it first. ``--claim-step N``: at step
  N instead (a swarm resumed from a checkpoint at step N, before any trainer publishes its step).

It runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.optim.progress_tracker import LocalTrainingProgress  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from swarm import discovery, records  # noqa: E402
from swarm.config import adopt_shared  # noqa: E402
from swarm.progress import read_trainer_records  # noqa: E402


def lie_about_progress(dht, run_id: str, own: bytes, stop: threading.Event) -> None:
    while not stop.is_set():
        claim = LocalTrainingProgress(peer_id=dht.peer_id.to_bytes(), epoch=10**12, samples_accumulated=10**15,
                                      samples_per_second=1e15, time=get_dht_time(), client_mode=False)
        dht.store(f"{run_id}_progress", claim.dict(), get_dht_time() + 20, subkey=own)
        stop.wait(1.0)


def forge(dht, key, published, run_id: str, own: bytes) -> dict:
    """Every forgery the DHT is asked to take, and whether it took it."""
    deadline = time.monotonic() + 120
    trainers = {}
    while not trainers and time.monotonic() < deadline:
        trainers = read_trainer_records(dht, run_id)
        time.sleep(1)
    victim, record = next(iter(trainers.items()))
    later = get_dht_time() + 30
    forged_record = record.copy(update=dict(step=10**6, loss=0.0)).dict()
    tampered = dict(published.value, config_yaml=published.value["config_yaml"].replace("lr:", "lr: 0.5 #"))
    shared = dict(published.shared, optimizer=dict(published.shared["optimizer"], lr=0.5))
    rival_subkey, rival = records.sign_config(key, run_id, adopt_shared(shared).shared_yaml())
    donors = f"{run_id}_state_averager_donors"
    victim_id = dht.peer_id.to_bytes()  # a donor entry naming a peer id that is not the signer's
    attempts = {
        "overwrite_trainer_record": dht.store(records.metrics_key(run_id), forged_record, later, subkey=victim),
        "tamper_config": dht.store(records.CONFIG_KEY, tampered, later, subkey=published.subkey),
        "overwrite_donor_entry": dht.store(donors, dict(peer_id=b"x", priority=1e6), later, subkey=victim),
        "unsigned_donor_registry": dht.store(f"{run_id}_state_averager.all_averagers", 1e9, later,
                                             subkey=victim_id),
        "nan_record": dht.store(records.metrics_key(run_id), dict(record.dict(), loss=float("nan")), later,
                                subkey=own),
        "huge_record": dht.store(records.metrics_key(run_id), dict(record.dict(), step=10**15), later, subkey=own),
        "far_future_record": dht.store(records.metrics_key(run_id), record.dict(), get_dht_time() + 10 * 86400,
                                       subkey=own),
        "unknown_key": dht.store("flood_0", b"x" * 100, later),
        "rival_config": dht.store(records.CONFIG_KEY, rival, get_dht_time() + 3600, subkey=rival_subkey),
    }
    after = read_trainer_records(dht, run_id).get(victim)
    return dict(attempts=attempts, victim_step_after=after.step if after else None, rival_subkey=rival_subkey)


def serve_foreign_state(dht, key, config):
    """A state averager offering a model of another init seed at the swarm's step, as a donor."""
    from swarm.config import build_config
    from swarm.model import build_model
    from swarm.optimizer import build_state_averager
    from swarm.tokenizer import build_tokenizer
    from swarm.training import owner_subkey

    foreign = build_config(dict(config.shared(), model=dict(config.shared()["model"], init_seed=12345)))
    model = build_model(foreign.model, vocab_size=build_tokenizer(foreign.tokenizer).vocab_size)
    averager = build_state_averager(model.parameters(), dht=dht, run_id=config.run_id, optim=config.optimizer,
                                    averaging=config.averaging, timeouts=config.timeouts, share=True, start=False,
                                    owner_subkey=owner_subkey(key))
    averager.run_in_background(await_ready=True)
    return averager


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addresses", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lie-progress", action="store_true")
    parser.add_argument("--forge", action="store_true")
    parser.add_argument("--serve-foreign-state", action="store_true")
    parser.add_argument("--claim-step", type=int)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dht, key, published = discovery.connect(args.addresses, timeout=60)
    run_id = published.record.run_id
    config = adopt_shared(published.shared)
    from hivemind.optim.progress_tracker import TrainingProgressSchema
    from hivemind.dht.schema import SchemaValidator

    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id)])
    own = RSASignatureValidator(key).local_public_key
    averager = None
    try:
        if args.lie_progress:
            threading.Thread(target=lie_about_progress, args=(dht, run_id, own, stop), daemon=True).start()
        result = dict(peer_id=dht.peer_id.to_base58())
        if args.serve_foreign_state:
            averager = serve_foreign_state(dht, key, config)
            threading.Thread(target=_keep_claiming, args=(averager, dht, run_id, stop, args.claim_step),
                             daemon=True).start()
        if args.forge:
            result.update(forge(dht, key, published, run_id, own))
        partial = Path(args.out + ".partial")  # renamed into place: a test waiting for the file reads it whole
        partial.write_text(json.dumps(result, default=repr))
        partial.rename(args.out)
        stop.wait()
        return 0
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def _keep_claiming(averager, dht, run_id: str, stop: threading.Event, step: int | None = None) -> None:
    """Claim the step the trainers are at (or ``step``), and outrank them as a donor."""
    while not stop.is_set():
        steps = [step] if step is not None else [r.step for r in read_trainer_records(dht, run_id).values()]
        if steps:
            averager.local_epoch = max(steps)
            averager.state_sharing_priority = max(steps) + 2.5  # (records lag a step behind the trainers)
        stop.wait(1.0)


if __name__ == "__main__":
    sys.exit(main())

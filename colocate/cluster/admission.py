"""DeviceAdmission: a supervisor's arbiter, checked against every other supervisor
on the same device.

The MemoryArbiter keeps one supervisor's books; the SharedLedger holds what each
supervisor of the device has booked in total. An admission takes the device's
lock, counts the others' bookings as taken, asks the arbiter, and records the new
total before letting go, so of two supervisors racing for the last bytes exactly
one wins. One service at a time: every admit and release is its own transaction.
"""
from __future__ import annotations

from colocate.config import ServiceSpec
from colocate.memory.arbiter import AdmissionRefused, MemoryArbiter
from colocate.memory.shared_ledger import SharedLedger
from colocate.memory.sizing import ServiceDemand
from colocate.sizes import format_size


class DeviceAdmission:
    def __init__(self, arbiter: MemoryArbiter, ledger: SharedLedger) -> None:
        self.arbiter = arbiter
        self.ledger = ledger
        with ledger.transaction() as entries:
            ledger.book(entries, self.own_bytes)

    @property
    def own_bytes(self) -> int:
        """This supervisor's bookings as the other supervisors must count them. The
        headroom is left out: each supervisor keeps its own, so counting the
        others' too would reserve it once per supervisor."""
        return self.arbiter.reserved_bytes - self.arbiter.headroom

    def admit(self, service: ServiceSpec) -> ServiceDemand:
        """Book `service` here and in the shared ledger, or raise AdmissionRefused."""
        with self.ledger.transaction() as entries:
            elsewhere = self.ledger.others_bytes(entries)
            needed = self.arbiter.cost(service)
            free = self.arbiter.free_bytes - elsewhere
            if elsewhere and needed > free:
                holders = ", ".join(sorted(self.ledger.others(entries)))
                raise AdmissionRefused(
                    self.arbiter.device, self.arbiter.demand(service), needed, free,
                    f"; {elsewhere:,} bytes ({format_size(elsewhere)}) of the device are "
                    f"booked by other supervisors ({holders})")
            demand = self.arbiter.admit(service)       # refuses on its own books too
            self.ledger.book(entries, self.own_bytes)
        return demand

    def others_bytes(self) -> int:
        """What the other supervisors of the device hold now."""
        with self.ledger.transaction() as entries:
            return self.ledger.others_bytes(entries)

    def release(self, name: str) -> None:
        with self.ledger.transaction() as entries:
            self.arbiter.release(name)
            self.ledger.book(entries, self.own_bytes)

    def is_admitted(self, name: str) -> bool:
        return any(d.service == name for d in self.arbiter.admitted())

    def release_all(self) -> None:
        with self.ledger.transaction() as entries:
            for demand in self.arbiter.admitted():
                self.arbiter.release(demand.service)
            self.ledger.book(entries, self.own_bytes)

    def close(self) -> None:
        """Release everything and leave the shared ledger."""
        for demand in self.arbiter.admitted():
            self.arbiter.release(demand.service)
        self.ledger.remove()

"""The thin asyncio adapter around the sans-IO ``DecisionEngine``.

The engine reads no clock and starts no threads; ``EngineDriver`` gives it a loop:

* it keeps one ``loop.call_later`` armed for ``engine.next_timer()`` (re-armed whenever the
  engine's timers change, through ``engine.on_timers_changed``) and calls
  ``engine.handle_timer(clock())`` when it fires;
* ``reload()`` (call it from the daemon's SIGHUP handler, or from ``vstack rules reload``)
  reloads the ``RulesFile`` into the engine, keeping the old rules on error;
* with ``poll_s`` it also stats the rules file every ``poll_s`` seconds and reloads on change.

Everything runs on the loop's thread, like the datapath that calls ``decide``/``submit``::

    rules = RulesFile(config.execution.rules)
    engine = rules.engine(None, sink)
    datapath = Datapath(config, engine, sink)
    engine.actuator = datapath
    driver = EngineDriver(engine, rules, poll_s=1.0)
    driver.start()
    loop.add_signal_handler(signal.SIGHUP, driver.reload)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from vstack.decision.engine import DecisionEngine, RulesFile

log = logging.getLogger("vstack.decision")


class EngineDriver:
    def __init__(self, engine: DecisionEngine, rules: RulesFile | None = None, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float | None = None) -> None:
        self.engine = engine
        self.rules = rules
        self.clock = clock
        self.poll_s = poll_s
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._running = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def start(self) -> None:
        self._running = True
        self.engine.on_timers_changed = self.rearm
        self.rearm()
        if self.poll_s is not None and self.rules is not None:
            self._poll = self.loop.call_later(self.poll_s, self._check_file)

    def stop(self) -> None:
        self._running = False
        if self.engine.on_timers_changed == self.rearm:
            self.engine.on_timers_changed = None
        for h in (self._timer, self._poll):
            if h is not None:
                h.cancel()
        self._timer = self._poll = None

    def rearm(self) -> None:
        """(Re-)arm the loop timer for the engine's next timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._running:
            return
        t = self.engine.next_timer()
        if t is not None:
            self._timer = self.loop.call_later(max(0.0, t - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.engine.handle_timer(self.clock())  # never raises; calls rearm via the hook
        if self._timer is None:
            self.rearm()

    def reload(self) -> bool:
        """Reload the rules file into the engine (old rules stay on error)."""
        if self.rules is None:
            log.info("no rules file to reload")
            return False
        ok = self.rules.reload(self.engine)
        self.rearm()
        return ok

    def _check_file(self) -> None:
        self._poll = None
        if not self._running or self.rules is None or self.poll_s is None:
            return
        try:
            if self.rules.changed():
                log.info("rules file %s changed: reloading", self.rules.path)
                self.reload()
        finally:
            self._poll = self.loop.call_later(self.poll_s, self._check_file)

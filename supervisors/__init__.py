"""The supervision runtime: OTP-style supervisors over pykka actors, with no knowledge of markets.

Bottom layer of candlekeeper. `Child` (a supervised actor), `Supervisor` and `ChildSpec`, restart
intensity and backoff, one timer thread per system (`Scheduler`), lifecycle events, and the
clocks (`Runtime.clock` monotonic, `Runtime.wall` epoch) that every layer above reads time from.
"""

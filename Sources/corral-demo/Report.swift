import Synchronization

/// What the demo counts while it runs, shared by its tasks.
final class Report: Sendable {
    enum Outcome {
        case succeeded
        case timedOut
    }

    struct Totals {
        var succeeded = 0
        var timedOut = 0
        var permitsInUse = 0
        var peakPermits = 0
        var callsInFlight = 0
        var peakCallsInFlight = 0
        var peakQueueDepth = 0
    }

    private let state = Mutex(Totals())

    func permits(_ delta: Int) {
        state.withLock { totals in
            totals.permitsInUse += delta
            totals.peakPermits = max(totals.peakPermits, totals.permitsInUse)
            totals.callsInFlight += delta > 0 ? 1 : -1
            totals.peakCallsInFlight = max(totals.peakCallsInFlight, totals.callsInFlight)
        }
    }

    func queued(depth: Int) {
        state.withLock { $0.peakQueueDepth = max($0.peakQueueDepth, depth) }
    }

    func finished(_ outcome: Outcome) {
        state.withLock { totals in
            switch outcome {
            case .succeeded: totals.succeeded += 1
            case .timedOut: totals.timedOut += 1
            }
        }
    }

    var totals: Totals {
        state.withLock { $0 }
    }

    func summary(calls: Int, elapsed: Duration, rate: Int) -> String {
        let totals = self.totals
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let achieved = seconds > 0 ? Double(calls) / seconds : 0
        return """
            calls made:           \(totals.succeeded + totals.timedOut) of \(calls)
              succeeded:          \(totals.succeeded)
              timed out:          \(totals.timedOut) (TimeoutError, the permits were returned)
            peak permits in use:  \(totals.peakPermits) of 100
            peak calls in flight: \(totals.peakCallsInFlight)
            peak queue depth:     \(totals.peakQueueDepth) of 64
            throughput:           \(Int(achieved)) calls/s (limit \(rate)/s)
            elapsed:              \(elapsed)
            """
    }
}

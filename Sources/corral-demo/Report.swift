import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

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
        let seconds = elapsed.inSeconds
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

// MARK: - Formatting helpers shared by the scenarios

extension Duration {
    /// The duration in seconds.
    var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }

    /// The duration in whole microseconds (rounded down).
    var inMicroseconds: Int {
        Int(components.seconds) * 1_000_000 + Int(components.attoseconds / 1_000_000_000_000)
    }

    /// The duration in milliseconds, with one decimal: `"12.5 ms"`.
    var inMilliseconds: String {
        fixed(inSeconds * 1_000, digits: 1) + " ms"
    }
}

/// `value` with `digits` decimals (rounded), without Foundation: `fixed(2.345, digits: 1) == "2.3"`.
func fixed(_ value: Double, digits: Int) -> String {
    var scale = 1
    for _ in 0..<digits { scale *= 10 }
    let scaled = Int((abs(value) * Double(scale)).rounded())
    let sign = value < 0 && scaled != 0 ? "-" : ""
    guard digits > 0 else { return sign + "\(scaled)" }
    let fraction = String(scaled % scale)
    return sign + "\(scaled / scale)." + String(repeating: "0", count: digits - fraction.count) + fraction
}

/// `part` as a percentage of `whole`, rounded: `"42%"` (`"-"` when `whole` is zero).
func percent(_ part: Double, of whole: Double) -> String {
    whole > 0 ? "\(Int((100 * part / whole).rounded()))%" : "-"
}

/// `rows` as a text table, each line indented by `indent`: every column as wide as its widest
/// cell; the columns in `leftAligned` (the first, by default) left-aligned, the others
/// right-aligned.
func table(_ rows: [[String]], leftAligned: Set<Int> = [0], indent: String = "  ") -> String {
    let columns = rows.map(\.count).max() ?? 0
    let widths = (0..<columns).map { column in
        rows.map { column < $0.count ? $0[column].count : 0 }.max() ?? 0
    }
    return rows.map { row in
        let cells = row.enumerated().map { column, cell in
            let padding = String(repeating: " ", count: widths[column] - cell.count)
            return leftAligned.contains(column) ? cell + padding : padding + cell
        }
        var line = indent + cells.joined(separator: "  ")
        while line.last == " " { line.removeLast() }
        return line
    }.joined(separator: "\n")
}

/// Prints a progress line: on a terminal it replaces the previous one (end it with `print()`),
/// cut to the terminal's width so that it stays on one line; otherwise it is printed as a line
/// of its own.
func printStatus(_ line: String) {
    if isatty(STDOUT_FILENO) != 0 {
        var line = line
        if let width = terminalWidth(), line.count >= width {
            line = String(line.prefix(width - 2)) + "…"
        }
        print("\r\u{1B}[2K" + line, terminator: "")
        fflush(nil)  // every output stream: stdout is a C global that Swift 6 cannot touch safely
    } else {
        print(line)
    }
}

/// The width of the terminal on standard output, in columns; nil if unknown.
func terminalWidth() -> Int? {
    #if os(Linux)
    var size = winsize()
    guard ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 1 else { return nil }
    return Int(size.ws_col)
    #else
    return nil
    #endif
}

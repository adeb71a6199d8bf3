import Corral
import Testing

/// Runs `body` and records a test issue if a task that a Corral structure started inside it
/// is still running once `body` has returned (after a short settle period) — goleak for
/// Corral.
///
/// ```swift
/// @Test func fetchesEveryPage() async throws {
///     try await expectNoLeakedTasks {
///         try await crawler.fetchAll(urls)     // uses withErrorGroup, TaskTracker, …
///     }
/// }
/// ```
///
/// The issue lists each structure (kind and name) with its live task count, e.g.
/// `TaskTracker "audit" still has 2 live tasks`. Tasks are counted in a ledger bound to the
/// current task (a task-local value), so tests running in parallel never see each other's
/// tasks.
///
/// - Parameters:
///   - settle: How long to keep checking for the tasks to finish before reporting them:
///     a structure may still be winding down a task just after `body` returns (a task that
///     has thrown its result but not yet exited). Checked often, so a clean run returns
///     at once; on a loaded machine the check also waits for 40 polls, each letting other
///     tasks run, however long they take.
///   - sourceLocation: Where to attribute the issue.
///   - body: The code under test.
/// - Returns: What `body` returns.
/// - Throws: What `body` throws (the leak check runs either way).
public func expectNoLeakedTasks<Result>(
    settle: Duration = .seconds(1),
    sourceLocation: SourceLocation = #_sourceLocation,
    isolation: isolated (any Actor)? = #isolation,
    _ body: () async throws -> Result
) async throws -> Result {
    // Untyped `throws` on purpose: rethrowing a generic typed error crashes Swift Testing
    // 6.3's backtrace hook (`_willThrowTyped`) on Linux.
    let ledger = TaskLedger()
    let outcome: Swift.Result<Result, any Error>
    do {
        outcome = .success(try await TaskLedger.$current.withValue(ledger, operation: body, isolation: isolation))
    } catch {
        outcome = .failure(error)
    }
    await checkNoLiveTasks(in: ledger, settle: settle, sourceLocation: sourceLocation)
    switch outcome {
    case .success(let result): return result
    case .failure(let error): throw error
    }
}

/// How many times the settle loop lets other tasks run before it may report, however long
/// that took.
let minimumSettleRounds = 40

/// Records an issue listing `ledger`'s live tasks if some are still live after `settle`
/// (and at least `minimumSettleRounds` chances to finish).
func checkNoLiveTasks(in ledger: TaskLedger, settle: Duration, sourceLocation: SourceLocation) async {
    let clock = ContinuousClock()
    let deadline = clock.now + settle
    var pause = Duration.microseconds(100)
    var rounds = 0
    // Time alone is not enough: on a loaded machine (parallel tests, a sanitizer, a job that
    // holds a thread) this task and the finishing ones may get no CPU for a while, and a
    // check that wakes past the deadline would report tasks that never had a chance to end.
    // So it also waits for a number of rounds, each letting the other tasks run.
    while ledger.liveTaskCount > 0 && (clock.now < deadline || rounds < minimumSettleRounds) {
        // Let the finishing tasks run; back off like goleak's retries. A cancelled test
        // cannot sleep: check once more and report.
        await Task.yield()
        do {
            try await Task.sleep(for: pause)
        } catch {
            break
        }
        rounds += 1
        pause = min(pause * 2, .milliseconds(20))
    }
    let live = ledger.liveTasks
    guard !live.isEmpty else { return }
    let report = live
        .sorted { $0.key.description < $1.key.description }
        .map { owner, count in "\(owner) still has \(count) live task\(count == 1 ? "" : "s")" }
        .joined(separator: "; ")
    Issue.record("Leaked Corral tasks after the scope returned: \(report)", sourceLocation: sourceLocation)
}

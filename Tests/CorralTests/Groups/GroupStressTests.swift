@testable import Corral
import CorralTesting
import Testing

/// Random errors, random cancellations, random limits: the error group and the tracker keep
/// their invariants. Sized for seconds; `CORRAL_STRESS_ITERATIONS=<rounds>` runs longer.
@Suite("Group stress")
struct GroupStressTests {
    @Test func errorGroup_randomErrorsAndCancellations_keepTheInvariants() async throws {
        let rounds = stressIterations(default: 60)
        for round in 0..<rounds {
            var generator = SplitMix64(seed: UInt64(3_000 + round))
            let limit: Int? = Bool.random(using: &generator) ? nil : Int.random(in: 1...6, using: &generator)
            let policy: ErrorGroupPolicy = Bool.random(using: &generator) ? .cancelAll : .collectAll
            let taskCount = Int.random(in: 0...80, using: &generator)
            let failing = Set((0..<taskCount).filter { _ in Int.random(in: 0..<8, using: &generator) == 0 })
            let cancelCaller = Int.random(in: 0..<4, using: &generator) == 0
            let running = Gauge()
            let started = Gauge()
            let finished = Gauge()
            let thrown = Log<Int>()

            let outcome = Task {
                try await expectNoLeakedTasks {
                    try await withErrorGroup(limit: limit, onError: policy) { group in
                        for index in 0..<taskCount {
                            try await group.addTask {
                                started.add(1)
                                running.add(1)
                                defer {
                                    running.add(-1)
                                    finished.add(1)
                                }
                                for _ in 0..<(index % 4) { await Task.yield() }
                                if failing.contains(index) {
                                    thrown.append(index)
                                    throw TestError(id: index)
                                }
                                try Task.checkCancellation()
                            }
                        }
                    }
                }
            }
            if cancelCaller {
                for _ in 0..<Int.random(in: 0...40, using: &generator) { await Task.yield() }
                outcome.cancel()
            }
            let result = await outcome.result

            let label = "round \(round): limit \(String(describing: limit)), \(policy), \(taskCount) tasks, failing \(failing.sorted()), cancelled \(cancelCaller)"
            if let limit { #expect(running.peak <= limit, "\(label)") }
            #expect(started.current == finished.current, "\(label): a task outlived the group")
            #expect(running.current == 0, "\(label)")
            switch result {
            case .success:
                #expect(thrown.count == 0, "\(label): a task error was swallowed")
                if !cancelCaller { #expect(started.current == taskCount, "\(label): a task never ran") }
            case .failure(let error as TestError):
                #expect(policy == .cancelAll, "\(label)")
                #expect(thrown.elements.contains(error.id), "\(label): threw an error no task threw")
            case .failure(let error as ErrorGroupFailure):
                #expect(policy == .collectAll, "\(label)")
                let ids = error.errors.compactMap { ($0 as? TestError)?.id }
                #expect(ids.count == error.errors.count, "\(label): a non-task error in the failure")
                #expect(ids.sorted() == thrown.elements.sorted(), "\(label): collected ≠ thrown")
            case .failure(is CancellationError):
                #expect(cancelCaller || thrown.count > 0, "\(label): cancelled out of nowhere")
            case .failure(let error):
                Issue.record("\(label): unexpected error \(error)")
            }
        }
    }

    @Test func taskTracker_randomSpawnsCancellationsAndClose_keepTheInvariants() async throws {
        let rounds = stressIterations(default: 40)
        for round in 0..<rounds {
            var generator = SplitMix64(seed: UInt64(4_000 + round))
            let limit = Int.random(in: 1...8, using: &generator)
            let tracker = TaskTracker(name: "stress", limit: limit)
            let live = Gauge()
            let spawners = (0..<4).map { spawner in
                let count = Int.random(in: 0...30, using: &generator)
                return Task {
                    for index in 0..<count {
                        do {
                            try await tracker.spawn {
                                live.add(1)
                                defer { live.add(-1) }
                                for _ in 0..<(index % 3) { await Task.yield() }
                                if (index + spawner) % 7 == 0 { throw TestError(id: index) }
                            }
                        } catch {
                            return  // closed, or this spawner was cancelled
                        }
                    }
                }
            }
            for _ in 0..<Int.random(in: 0...20, using: &generator) { await Task.yield() }
            if Bool.random(using: &generator) { tracker.cancelAll() }
            if Bool.random(using: &generator), let victim = spawners.randomElement(using: &generator) { victim.cancel() }
            for _ in 0..<Int.random(in: 0...20, using: &generator) { await Task.yield() }
            tracker.close()
            for spawner in spawners { await spawner.value }
            try await tracker.wait()
            #expect(live.peak <= limit, "round \(round)")
            #expect(live.current == 0, "round \(round)")
            #expect(tracker.count == 0, "round \(round)")
            #expect(tracker.heldHandles == 0, "round \(round)")
        }
    }
}

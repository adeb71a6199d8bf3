@testable import Corral
import CorralTesting
import Testing

/// Random interleavings of every operation, including cancellation, checking conservation:
/// permits come back to capacity, every element sent is received exactly once or handed
/// back, tokens are never over-granted.
///
/// Sized to run in seconds; `CORRAL_STRESS_ITERATIONS=<rounds>` runs more rounds.
@Suite("Primitive stress")
struct PrimitiveStressTests {
    @Test func semaphore_randomAcquireReleaseCancel_conservesPermits() async throws {
        let rounds = stressIterations(default: 40)
        for round in 0..<rounds {
            var generator = SplitMix64(seed: UInt64(round))
            let capacity = Int.random(in: 1...8, using: &generator)
            let semaphore = AsyncSemaphore(permits: capacity)
            let inUse = Gauge()
            let workers = 12
            let seeds = (0..<workers).map { _ in generator.next() }
            let tasks = seeds.map { seed in
                Task {
                    var random = SplitMix64(seed: seed)
                    for _ in 0..<50 {
                        let weight = Int.random(in: 1...capacity, using: &random)
                        do {
                            switch Int.random(in: 0..<3, using: &random) {
                            case 0: try await semaphore.acquire(weight)
                            case 1: try await semaphore.acquire(weight, timeout: .microseconds(Int64.random(in: 0...200, using: &random)))
                            default: guard semaphore.tryAcquire(weight) else { continue }
                            }
                        } catch is CancellationError {
                            return
                        } catch is TimeoutError {
                            continue
                        }
                        inUse.add(weight)
                        for _ in 0..<Int.random(in: 0...3, using: &random) { await Task.yield() }
                        inUse.add(-weight)
                        semaphore.release(weight)
                    }
                }
            }
            // Cancel a random subset at random moments.
            for task in tasks where Bool.random(using: &generator) {
                for _ in 0..<Int.random(in: 0...20, using: &generator) { await Task.yield() }
                task.cancel()
            }
            for task in tasks { _ = await task.result }
            #expect(inUse.peak <= capacity, "round \(round): \(inUse.peak) permits in use of \(capacity)")
            #expect(semaphore.availablePermits == capacity, "round \(round)")
            #expect(semaphore.waiters == 0, "round \(round)")
        }
    }

    @Test func channel_randomSendReceiveCancelClose_conservesElements() async throws {
        let rounds = stressIterations(default: 40)
        for round in 0..<rounds {
            var generator = SplitMix64(seed: UInt64(1_000 + round))
            let channel = BoundedChannel<Int>(capacity: Int.random(in: 0...4, using: &generator))
            let accepted = Log<Int>()
            let returned = Log<Int>()
            let received = Log<Int>()
            let producers = (0..<4).map { producer in
                Task {
                    for sequence in 0..<100 {
                        let element = producer * 1_000 + sequence
                        do {
                            if sequence % 3 == 0 {
                                guard channel.trySend(element) == .enqueued else { continue }
                            } else {
                                try await channel.send(element)
                            }
                            accepted.append(element)
                        } catch let error as ChannelError<Int> {
                            returned.append(error.element)
                            return
                        } catch {
                            return  // cancelled: the element was not sent
                        }
                    }
                }
            }
            let consumers = (0..<3).map { _ in
                Task {
                    while let element = try await channel.receive() { received.append(element) }
                }
            }
            let cancels: [() -> Void] = producers.map { task in { task.cancel() } } + consumers.map { task in { task.cancel() } }
            for cancel in cancels where Int.random(in: 0..<4, using: &generator) == 0 {
                for _ in 0..<Int.random(in: 0...30, using: &generator) { await Task.yield() }
                cancel()
            }
            if Bool.random(using: &generator) {
                for _ in 0..<Int.random(in: 0...30, using: &generator) { await Task.yield() }
                channel.close()  // close while sends are in flight
            }
            // If every consumer was cancelled, producers parked on a full buffer would wait
            // forever: close the channel once the last consumer is gone (their elements come
            // back in ChannelError).
            let consumersGone = Task {
                for consumer in consumers { _ = await consumer.result }
                channel.close()
            }
            for producer in producers { _ = await producer.result }
            channel.close()
            await consumersGone.value
            while case .element(let element) = channel.tryReceive() { received.append(element) }

            let sentOnce = accepted.elements.sorted()
            #expect(received.elements.sorted() == sentOnce, "round \(round): received ≠ accepted")
            #expect(Set(returned.elements).isDisjoint(with: sentOnce), "round \(round): an element both sent and returned")
            #expect(channel.waitingSenders == 0 && channel.waitingReceivers == 0)
        }
    }

    @Test func rateLimiter_randomWaitsAndCancellations_neverOverGrant() async throws {
        let rounds = stressIterations(default: 20)
        for round in 0..<rounds {
            var generator = SplitMix64(seed: UInt64(2_000 + round))
            let clock = ManualClock()
            let burst = Int.random(in: 1...5, using: &generator)
            let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: burst, clock: clock)
            let granted = Gauge()
            let tasks = (0..<8).map { index in
                Task {
                    let tokens = 1 + index % burst
                    do {
                        try await limiter.wait(tokens)
                        granted.add(tokens)
                    } catch {}
                }
            }
            var advanced = 0
            for step in 0..<40 {
                if step % 7 == 3, let victim = tasks.randomElement(using: &generator) { victim.cancel() }
                await Task.yield()
                clock.advance(by: .seconds(1))
                advanced += 1
                // Never more than the initial burst plus what the elapsed time refilled.
                #expect(granted.current <= burst + advanced, "round \(round)")
            }
            for task in tasks { task.cancel() }
            for task in tasks { await task.value }
            #expect(granted.current <= burst + advanced)
            #expect(limiter.waiters == 0, "round \(round)")
        }
    }
}

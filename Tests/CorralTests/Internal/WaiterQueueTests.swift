@testable import Corral
import Testing

@Suite("WaiterQueue")
struct WaiterQueueTests {
    typealias Queue = WaiterQueue<String, Int>

    @Test func enqueue_keepsArrivalOrder() {
        var queue = Queue()
        _ = queue.enqueue("a")
        _ = queue.enqueue("b")
        _ = queue.enqueue("c")
        #expect(queue.payloads == ["a", "b", "c"])
        #expect(queue.first?.payload == "a")
        #expect(queue.count == 3)
    }

    @Test func settleFirst_removesFromTheHead() {
        var queue = Queue()
        _ = queue.enqueue("a")
        _ = queue.enqueue("b")
        #expect(queue.settleFirst(with: 1)?.payload == "a")
        #expect(queue.payloads == ["b"])
        #expect(queue.settledCount == 1)  // "a" had not suspended: its outcome waits for it
    }

    @Test func settleById_removesFromTheMiddle_inConstantTime() {
        var queue = Queue()
        _ = queue.enqueue("a")
        let b = queue.enqueue("b")
        _ = queue.enqueue("c")
        #expect(queue.settle(b, with: 0)?.payload == "b")
        #expect(queue.payloads == ["a", "c"])
        #expect(queue.settle(b, with: 0) == nil)  // a second cancellation is a no-op
    }

    @Test func settleById_ofTheTail_thenEnqueue_linksCorrectly() {
        var queue = Queue()
        _ = queue.enqueue("a")
        let b = queue.enqueue("b")
        _ = queue.settle(b, with: 0)
        _ = queue.enqueue("c")
        #expect(queue.payloads == ["a", "c"])
    }

    @Test func staleId_neverMatchesTheWaiterThatReusedItsSlot() async {
        var queue = Queue()
        let first = queue.enqueue("first")
        _ = queue.settle(first, with: 0)
        // Pick up the settled outcome, freeing the slot.
        let resumption = await withUnsafeContinuation { (continuation: UnsafeContinuation<Int, Never>) in
            let resumption = queue.suspend(first, continuation: continuation)
            resumption?.resume()
        }
        #expect(resumption == 0)
        let second = queue.enqueue("second")
        #expect(second.slot == first.slot)  // the slot is reused…
        #expect(queue.settle(first, with: 9) == nil)  // …but the old id does not touch it
        #expect(queue.payloads == ["second"])
    }

    @Test func suspend_afterSettle_resumesAtOnceWithTheOutcome() async {
        var queue = Queue()
        let id = queue.enqueue("x")
        _ = queue.settleFirst(with: 42)
        let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<Int, Never>) in
            queue.suspend(id, continuation: continuation)?.resume()
        }
        #expect(outcome == 42)
        #expect(queue.settledCount == 0)
    }

    @Test func settle_afterSuspend_returnsTheResumption() async {
        var queue = Queue()
        let id = queue.enqueue("x")
        let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<Int, Never>) in
            #expect(queue.suspend(id, continuation: continuation) == nil)
            let settled = queue.settle(id, with: 7)
            #expect(settled?.payload == "x")
            settled?.resumption?.resume()
        }
        #expect(outcome == 7)
        #expect(queue.isEmpty)
    }

    @Test func settleAll_drainsInOrder() {
        var queue = Queue()
        for name in ["a", "b", "c"] { _ = queue.enqueue(name) }
        #expect(queue.settleAll(with: 0).map(\.payload) == ["a", "b", "c"])
        #expect(queue.isEmpty)
        #expect(queue.first == nil)
    }

    @Test func randomOperations_matchAReferenceModel() {
        var generator = SplitMix64(seed: 0xC0FFEE)
        var queue = WaiterQueue<Int, Int>()
        var model: [(id: WaiterID, value: Int)] = []
        for step in 0..<stressIterations(default: 20_000) {
            switch Int.random(in: 0..<3, using: &generator) {
            case 0:
                model.append((queue.enqueue(step), step))
            case 1 where !model.isEmpty:
                #expect(queue.settleFirst(with: 0)?.payload == model.removeFirst().value)
            case 2 where !model.isEmpty:
                let index = Int.random(in: 0..<model.count, using: &generator)
                #expect(queue.settle(model[index].id, with: 0)?.payload == model[index].value)
                model.remove(at: index)
            default:
                break
            }
            #expect(queue.count == model.count)
        }
        #expect(queue.payloads == model.map(\.value))
    }
}

extension Resumption: Equatable where Outcome: Equatable {
    public static func == (lhs: Resumption, rhs: Resumption) -> Bool { lhs.outcome == rhs.outcome }
}

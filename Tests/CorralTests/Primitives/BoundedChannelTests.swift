@testable import Corral
import Testing

@Suite("BoundedChannel")
struct BoundedChannelTests {
    @Test func sendThenReceive_inOrder_withoutWaiting() async throws {
        let channel = BoundedChannel<Int>(capacity: 3)
        try await channel.send(1)
        try await channel.send(2)
        try await channel.send(3)
        #expect(channel.count == 3)
        #expect(try await channel.receive() == 1)
        #expect(try await channel.receive() == 2)
        #expect(try await channel.receive() == 3)
        #expect(channel.count == 0)
    }

    @Test func send_suspendsWhileFull_andResumesWhenReceived() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        try await channel.send(1)
        let sender = Task { try await channel.send(2) }
        await waitUntil("sender parked") { channel.waitingSenders == 1 }
        #expect(channel.count == 1)
        #expect(try await channel.receive() == 1)
        try await sender.value
        // The parked sender's element moved into the buffer when a slot freed.
        #expect(channel.count == 1)
        #expect(try await channel.receive() == 2)
    }

    @Test func receive_suspendsWhileEmpty_andGetsTheNextElement() async throws {
        let channel = BoundedChannel<String>(capacity: 4)
        let receiver = Task { try await channel.receive() }
        await waitUntil { channel.waitingReceivers == 1 }
        try await channel.send("hello")
        #expect(try await receiver.value == "hello")
        #expect(channel.count == 0)  // handed over directly, never buffered
    }

    @Test func rendezvous_sendCompletesOnlyWhenReceived() async throws {
        let channel = BoundedChannel<Int>(capacity: 0)
        #expect(channel.trySend(1) == .full)  // nobody is receiving
        let sender = Task { try await channel.send(7) }
        await waitUntil { channel.waitingSenders == 1 }
        #expect(channel.count == 0)
        #expect(try await channel.receive() == 7)
        try await sender.value
        let receiver = Task { try await channel.receive() }
        await waitUntil { channel.waitingReceivers == 1 }
        #expect(channel.trySend(8) == .enqueued)  // a receiver is waiting: handed over
        #expect(try await receiver.value == 8)
    }

    @Test func trySend_distinguishesFullFromClosed() {
        let channel = BoundedChannel<Int>(capacity: 1)
        #expect(channel.trySend(1) == .enqueued)
        #expect(channel.trySend(2) == .full)
        channel.close()
        #expect(channel.trySend(3) == .closed)
    }

    @Test func tryReceive_distinguishesEmptyFromClosed() {
        let channel = BoundedChannel<Int>(capacity: 1)
        guard case .empty = channel.tryReceive() else { Issue.record("expected empty"); return }
        _ = channel.trySend(5)
        guard case .element(5) = channel.tryReceive() else { Issue.record("expected 5"); return }
        _ = channel.trySend(6)
        channel.close()
        guard case .element(6) = channel.tryReceive() else { Issue.record("expected buffered 6 after close"); return }
        guard case .closed = channel.tryReceive() else { Issue.record("expected closed"); return }
    }

    @Test func tryReceive_takesAParkedSendersElement() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        try await channel.send(1)
        let sender = Task { try await channel.send(2) }
        await waitUntil { channel.waitingSenders == 1 }
        guard case .element(1) = channel.tryReceive() else { Issue.record("expected 1"); return }
        try await sender.value
        guard case .element(2) = channel.tryReceive() else { Issue.record("expected 2"); return }
    }

    @Test func close_deliversBufferedElements_thenEnds() async throws {
        let channel = BoundedChannel<Int>(capacity: 4)
        for value in 1...3 { try await channel.send(value) }
        channel.close()
        #expect(channel.isClosed)
        var received: [Int] = []
        for try await value in channel { received.append(value) }
        #expect(received == [1, 2, 3])
        #expect(try await channel.receive() == nil)
    }

    @Test func close_failsParkedSenders_withTheirElement() async throws {
        let channel = BoundedChannel<String>(capacity: 1)
        try await channel.send("buffered")
        let sender = Task { try await channel.send("parked") }
        await waitUntil { channel.waitingSenders == 1 }
        channel.close()
        do {
            try await sender.value
            Issue.record("the parked send should have failed")
        } catch let error as ChannelError<String> {
            #expect(error.code == .closed)
            #expect(error.element == "parked")
        }
        // The buffered element is still delivered; nothing else is.
        #expect(try await channel.receive() == "buffered")
        #expect(try await channel.receive() == nil)
        #expect(channel.waitingSenders == 0)
    }

    @Test func close_finishesParkedReceivers() async throws {
        let channel = BoundedChannel<Int>(capacity: 2)
        let receivers = (0..<3).map { _ in Task { try await channel.receive() } }
        await waitUntil { channel.waitingReceivers == 3 }
        channel.close()
        for receiver in receivers {
            #expect(try await receiver.value == nil)
        }
        #expect(channel.waitingReceivers == 0)
    }

    @Test func send_afterClose_throwsWithTheElement() async throws {
        let channel = BoundedChannel<Int>(capacity: 2)
        channel.close()
        channel.close()  // idempotent
        await #expect(throws: ChannelError<Int>.self) { try await channel.send(1) }
        do {
            try await channel.send(9)
        } catch let error as ChannelError<Int> {
            #expect(error.element == 9)
        }
    }

    @Test func receivers_areServedInArrivalOrder() async throws {
        let channel = BoundedChannel<Int>(capacity: 0)
        var receivers: [Task<Int?, any Error>] = []
        for index in 0..<4 {
            receivers.append(Task { try await channel.receive() })
            await waitUntil("receiver \(index) parked") { channel.waitingReceivers == index + 1 }
        }
        for value in 0..<4 { try await channel.send(value) }
        for (index, receiver) in receivers.enumerated() {
            #expect(try await receiver.value == index)
        }
    }

    @Test func senders_areServedInArrivalOrder() async throws {
        let channel = BoundedChannel<Int>(capacity: 0)
        var senders: [Task<Void, any Error>] = []
        for index in 0..<4 {
            senders.append(Task { try await channel.send(index) })
            await waitUntil("sender \(index) parked") { channel.waitingSenders == index + 1 }
        }
        var received: [Int] = []
        for _ in 0..<4 { received.append(try #require(try await channel.receive())) }
        #expect(received == [0, 1, 2, 3])
        for sender in senders { try await sender.value }
    }

    @Test func cancelledReceiver_throws_andConsumesNothing() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        let receiver = Task { try await channel.receive() }
        await waitUntil { channel.waitingReceivers == 1 }
        receiver.cancel()
        await #expect(throws: CancellationError.self) { try await receiver.value }
        #expect(channel.waitingReceivers == 0)
        try await channel.send(1)
        #expect(channel.count == 1)  // buffered, not handed to the cancelled receiver
        #expect(try await channel.receive() == 1)
    }

    @Test func cancelledSender_throws_andSendsNothing() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        try await channel.send(1)
        let sender = Task { try await channel.send(2) }
        await waitUntil { channel.waitingSenders == 1 }
        sender.cancel()
        await #expect(throws: CancellationError.self) { try await sender.value }
        #expect(channel.waitingSenders == 0)
        #expect(try await channel.receive() == 1)
        guard case .empty = channel.tryReceive() else { Issue.record("the cancelled send must not arrive"); return }
    }

    @Test func receive_honoursTheEnclosingDeadline() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(20)) { try await channel.receive() }
        }
        #expect(channel.waitingReceivers == 0)
    }

    @Test func send_honoursTheEnclosingDeadline() async throws {
        let channel = BoundedChannel<Int>(capacity: 0)
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(20)) { try await channel.send(1) }
        }
        #expect(channel.waitingSenders == 0)
    }

    @Test func iteration_throwsCancellationError_whenTheConsumerIsCancelled() async throws {
        let channel = BoundedChannel<Int>(capacity: 1)
        let consumer = Task {
            var count = 0
            for try await _ in channel { count += 1 }
            return count
        }
        try await channel.send(1)
        await waitUntil { channel.waitingReceivers == 1 }
        consumer.cancel()
        await #expect(throws: CancellationError.self) { try await consumer.value }
    }

    @Test func severalConsumers_eachElementReachesExactlyOne() async throws {
        let channel = BoundedChannel<Int>(capacity: 8)
        let count = 20_000
        let received = try await withThrowingTaskGroup(of: [Int].self) { group in
            for _ in 0..<4 {
                group.addTask {
                    var mine: [Int] = []
                    for try await value in channel { mine.append(value) }
                    return mine
                }
            }
            try await withThrowingTaskGroup(of: Void.self) { producers in
                for producer in 0..<4 {
                    producers.addTask {
                        for value in stride(from: producer, to: count, by: 4) { try await channel.send(value) }
                    }
                }
                try await producers.waitForAll()
            }
            channel.close()
            var all: [Int] = []
            for try await part in group { all += part }
            return all
        }
        #expect(received.count == count)
        #expect(Set(received).count == count)
        #expect(received.sorted() == Array(0..<count))
    }

    /// The receive/cancel race: receivers are cancelled while elements are being handed to
    /// them. Every element the channel accepted must be returned by exactly one receiver or
    /// still be in the buffer: none dropped, none duplicated.
    @Test func receiveCancelRace_neverDropsAnElement() async throws {
        let rounds = stressIterations(default: 300)
        for round in 0..<rounds {
            let channel = BoundedChannel<Int>(capacity: round % 3)
            let attempts = 8
            let receivers = (0..<attempts).map { _ in Task { try await channel.receive() } }
            let sender = Task {
                var accepted: [Int] = []
                for value in 0..<attempts where channel.trySend(value) == .enqueued {
                    accepted.append(value)
                }
                return accepted
            }
            for (index, receiver) in receivers.enumerated() where index % 2 == round % 2 {
                receiver.cancel()  // races the hand-over
            }
            let accepted = await sender.value
            channel.close()
            var delivered: [Int] = []
            for receiver in receivers {
                if let value = try? await receiver.value { delivered.append(value) }
            }
            while case .element(let value) = channel.tryReceive() { delivered.append(value) }
            #expect(delivered.sorted() == accepted, "round \(round)")
            #expect(channel.waitingReceivers == 0)
        }
    }

    /// A stricter form of the race: senders wait for each element to be accepted, so every
    /// one of them must come out exactly once.
    @Test func receiveCancelRace_everyAcceptedElementComesOutExactlyOnce() async throws {
        let rounds = stressIterations(default: 200)
        for round in 0..<rounds {
            let channel = BoundedChannel<Int>(capacity: round % 2)
            let total = 16
            let received = Log<Int>()
            let consumers = (0..<4).map { _ in
                Task {
                    while let value = try await channel.receive() { received.append(value) }
                }
            }
            let sender = Task {
                for value in 0..<total { try await channel.send(value) }
            }
            // Cancel some consumers while elements are in flight; keep one to drain.
            for consumer in consumers.dropFirst() { consumer.cancel() }
            try await sender.value
            channel.close()
            for consumer in consumers { _ = try? await consumer.value }
            // The cancelled consumers may have stopped early; drain anything left.
            while case .element(let value) = channel.tryReceive() { received.append(value) }
            #expect(received.elements.sorted() == Array(0..<total), "round \(round)")
        }
    }

    // MARK: - State machine

    @Test func stateMachine_receiverCancelled_afterBeingHandedAnElement_keepsIt() {
        var machine = ChannelStateMachine<Int>(capacity: 0)
        guard case .empty = machine.receiveRequested() else { Issue.record("expected empty"); return }
        let id = machine.receiverParked()
        guard case .sent(nil) = machine.sendRequested(5) else { Issue.record("expected handed over in place"); return }
        // The cancellation lost the race: nothing to do, the element stays with the receiver.
        #expect(machine.receiverCancelled(id).isEmpty)
        #expect(machine.receivers.settledCount == 1)
        #expect(machine.buffer.isEmpty)
    }

    @Test func stateMachine_invariants_holdThroughASequence() {
        var machine = ChannelStateMachine<Int>(capacity: 2)
        _ = machine.sendRequested(1)
        _ = machine.sendRequested(2)
        guard case .full = machine.sendRequested(3) else { Issue.record("expected full"); return }
        _ = machine.senderParked(3)
        #expect(machine.buffer.count == 2 && machine.senders.count == 1)
        guard case .element(1, _) = machine.receiveRequested() else { Issue.record("expected 1"); return }
        #expect(Array(machine.buffer) == [2, 3])
        #expect(machine.senders.isEmpty)
        _ = machine.closeRequested()
        guard case .element(2, nil) = machine.receiveRequested() else { Issue.record("expected 2"); return }
        guard case .element(3, nil) = machine.receiveRequested() else { Issue.record("expected 3"); return }
        guard case .finished = machine.receiveRequested() else { Issue.record("expected finished"); return }
    }
}

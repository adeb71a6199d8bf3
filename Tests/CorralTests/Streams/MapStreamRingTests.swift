@testable import Corral
import Synchronization
import Testing

/// The result ring of the concurrent-map engine, driven directly (one thread): its slot
/// layout for values of every size and alignment, and what it frees.
@Suite("MapStreamRing")
struct MapStreamRingTests {
    /// Counts live instances, to see that the ring frees what it holds, once.
    final class Tracked: Sendable {
        static let live = Atomic<Int>(0)
        let id: Int
        init(_ id: Int) {
            self.id = id
            Self.live.add(1, ordering: .relaxed)
        }
        deinit { Self.live.subtract(1, ordering: .relaxed) }
    }

    @Test(arguments: [1, 3, 64, 5000])
    func resultsComeBackByTicket_roundAfterRound(window: Int) {
        let ring = MapStreamRing<Int?>(window: window)
        defer { ring.deallocate() }
        for ticket in 0..<(3 * window + 1) {
            #expect(ring.take(ticket) == nil, "ticket \(ticket) before it is published")
            #expect(!ring.publish(ticket % 2 == 0 ? ticket : nil, ticket: ticket), "nobody waits")
            #expect(ring.isPublished(ticket))
            let taken: Int?? = ring.take(ticket)
            #expect(taken == .some(ticket % 2 == 0 ? ticket : nil))
            #expect(!ring.isPublished(ticket), "a taken slot is empty")
        }
    }

    /// Values wider and more aligned than the stamp that shares their slot.
    @Test func wideAndAlignedValues_keepTheirBytes() {
        let ring = MapStreamRing<SIMD8<Double>>(window: 4)
        defer { ring.deallocate() }
        for ticket in 0..<4 {
            _ = ring.publish(SIMD8(repeating: Double(ticket)), ticket: ticket)
        }
        for ticket in 0..<4 {
            #expect(ring.take(ticket) == SIMD8(repeating: Double(ticket)))
        }
    }

    @Test func theConsumersWaitIsReportedToTheProducerOfItsTicket() {
        let ring = MapStreamRing<Int>(window: 4)
        defer { ring.deallocate() }
        ring.consumerWaitsFor.pointee.store(1, ordering: .relaxed)
        #expect(!ring.publish(10, ticket: 0))
        #expect(ring.publish(11, ticket: 1))
    }

    @Test func deallocate_freesTheResultsNobodyTook_once() {
        let before = Tracked.live.load(ordering: .relaxed)
        let ring = MapStreamRing<Tracked>(window: 8)
        for ticket in 0..<6 { _ = ring.publish(Tracked(ticket), ticket: ticket) }
        #expect(ring.take(0)?.id == 0)
        #expect(ring.take(1)?.id == 1)
        #expect(Tracked.live.load(ordering: .relaxed) == before + 4)
        ring.deallocate()
        #expect(Tracked.live.load(ordering: .relaxed) == before)
    }
}

import Corral

// The records that flow through the pipeline and service scenarios, and the simulated
// downstream service their enrich stage calls.

// MARK: - Records

/// A line of the source, as read: `id,customer,amount,currency`, e.g. `10042,c-0193,19.99,EUR`.
struct RawRecord: Sendable {
    /// The line number in the source, from 1: identifies the record in the error counts.
    var line: Int
    var text: String

    /// The record parsed and checked.
    ///
    /// - Throws: ``MalformedRecord`` saying what is wrong.
    func validated() throws(MalformedRecord) -> Validated {
        let fields = text.split(separator: ",", omittingEmptySubsequences: false)
        guard fields.count == 4 else { throw MalformedRecord(line: line, reason: .fieldCount) }
        guard let id = Int(fields[0]), id >= 0 else { throw MalformedRecord(line: line, reason: .id) }
        let customer = fields[1]
        guard customer.hasPrefix("c-"), customer.count > 2, customer.dropFirst(2).allSatisfy({ ("0"..."9").contains($0) }) else {
            throw MalformedRecord(line: line, reason: .customer)
        }
        let amount = fields[2].split(separator: ".", omittingEmptySubsequences: false)
        guard amount.count == 2, amount[1].count == 2, let whole = Int(amount[0]), let cents = Int(amount[1]), whole >= 0, cents >= 0 else {
            throw MalformedRecord(line: line, reason: .amount)
        }
        guard let currency = Currency(rawValue: String(fields[3])) else {
            throw MalformedRecord(line: line, reason: .currency)
        }
        return Validated(line: line, id: id, customer: String(customer), amountCents: whole * 100 + cents, currency: currency)
    }
}

/// Why ``RawRecord/validated()`` refused a record.
struct MalformedRecord: Error, CustomStringConvertible {
    enum Reason: String, CaseIterable {
        case fieldCount = "wrong number of fields"
        case id = "bad id"
        case customer = "bad customer"
        case amount = "bad amount"
        case currency = "unknown currency"
    }

    var line: Int
    var reason: Reason

    var description: String { "line \(line): \(reason.rawValue)" }
}

enum Currency: String, Sendable, CaseIterable {
    case eur = "EUR", usd = "USD", gbp = "GBP"

    /// A fixed rate, good enough for a demo: euro cents for 100 cents of this currency.
    var euroCentsPer100: Int {
        switch self {
        case .eur: 100
        case .usd: 92
        case .gbp: 117
        }
    }
}

/// A record that passed validation.
struct Validated: Sendable {
    var line: Int
    var id: Int
    /// `c-` and digits (checked): safe to write into JSON as it is.
    var customer: String
    var amountCents: Int
    var currency: Currency

    /// Whether the order is large (450.00 or more, about one in ten): the service checks those
    /// with a heavy downstream call.
    var isLarge: Bool { amountCents >= 450_00 }
}

/// What the downstream service knows about a customer.
struct Customer: Sendable {
    enum Tier: String, Sendable {
        case gold, silver, bronze

        /// The discount, in percent.
        var discount: Int {
            switch self {
            case .gold: 10
            case .silver: 5
            case .bronze: 0
            }
        }
    }

    var tier: Tier
    var region: String
}

/// A validated record with its customer's details.
struct Enriched: Sendable {
    var record: Validated
    var customer: Customer

    /// The output record, a line of JSON: the amount in euros, after the tier's discount.
    var jsonLine: String {
        let euroCents = record.amountCents * record.currency.euroCentsPer100 / 100
        let discounted = euroCents * (100 - customer.tier.discount) / 100
        return """
            {"id":\(record.id),"customer":"\(record.customer)","tier":"\(customer.tier.rawValue)",\
            "region":"\(customer.region)","amount":"\(decimal(record.amountCents))",\
            "currency":"\(record.currency.rawValue)","eur":"\(decimal(discounted))"}
            """
    }

    private func decimal(_ cents: Int) -> String {
        "\(cents / 100)." + (cents % 100 < 10 ? "0" : "") + "\(cents % 100)"
    }
}

/// The source: `count` raw records, made as the pipeline pulls them (so its backpressure
/// reaches the source), a fraction `malformedRate` of them malformed in one of five ways.
/// Reproducible from `seed`.
struct RawRecords: AsyncSequence, Sendable {
    var count: Int
    var malformedRate: Double
    var seed: UInt64

    struct AsyncIterator: AsyncIteratorProtocol {
        var source: RawRecords
        var line = 0
        var random: SplitMix64

        mutating func next() async -> RawRecord? {
            guard line < source.count else { return nil }
            line += 1
            var id = "\(10_000 + line)"
            var customer = "c-\(Int.random(in: 0..<5_000, using: &random))"
            var amount = "\(Int.random(in: 1..<500, using: &random)).\(Int.random(in: 10..<100, using: &random))"
            var currency = Currency.allCases.randomElement(using: &random)!.rawValue
            var fields: Int = 4
            if Double.random(in: 0..<1, using: &random) < source.malformedRate {
                switch MalformedRecord.Reason.allCases.randomElement(using: &random)! {
                case .fieldCount: fields = 3
                case .id: id = "1O" + id.dropFirst(2)  // a letter O for a zero
                case .customer: customer = ""
                case .amount: amount += "x"
                case .currency: currency = "XBT"
                }
            }
            return RawRecord(line: line, text: [id, customer, amount, currency].prefix(fields).joined(separator: ","))
        }
    }

    func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(source: self, random: SplitMix64(seed: seed))
    }
}

// MARK: - The simulated downstream service

/// The service the enrich stage calls: a customer look-up that takes from 2/3 to 4/3 of
/// `latency` (1–2 ms by default; twice as long for a heavy call), fails with probability
/// `failureRate` (after its latency) and hangs for `hang` (longer than the caller's timeout)
/// with probability `slowRate`. The outcome of each try on each record is drawn from `seed`,
/// so runs are reproducible.
struct Downstream: Sendable {
    var failureRate: Double
    var slowRate: Double
    var hang: Duration
    /// The mean duration of a light call.
    var latency: Duration = .microseconds(1_500)
    var seed: UInt64

    func lookUp(_ customer: String, line: Int, attempt: Int, heavy: Bool = false) async throws -> Customer {
        var random = SplitMix64(seed: seed &+ UInt64(line) &* 16 &+ UInt64(attempt))
        let roll = Double.random(in: 0..<1, using: &random)
        if roll < slowRate {
            try await Task.sleep(for: hang)  // the caller's timeout cancels this
        } else {
            let mean = (heavy ? 2 : 1) * latency.inMicroseconds
            try await Task.sleep(for: .microseconds(Int.random(in: (2 * mean / 3)...(4 * mean / 3), using: &random)))
        }
        if roll < slowRate + failureRate { throw DownstreamUnavailable() }
        let number = Int(customer.dropFirst(2)) ?? 0
        return Customer(
            tier: number % 10 == 0 ? .gold : number % 10 < 4 ? .silver : .bronze,
            region: ["eu-west", "eu-north", "us-east", "ap-south"][number % 4])
    }
}

/// A downstream call that failed (the service's 503).
struct DownstreamUnavailable: Error, CustomStringConvertible {
    var description: String { "downstream unavailable (503)" }
}

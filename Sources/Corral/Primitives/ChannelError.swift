/// Thrown by ``BoundedChannel/send(_:)`` when the channel is closed before the element could
/// be delivered. Carries the element back, so nothing is lost.
public struct ChannelError<Element: Sendable>: Error, CustomStringConvertible {
    /// What went wrong.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case closed
        }
        fileprivate let base: Base

        /// The channel was closed: before the send, or while the sender waited for room.
        public static var closed: Code { Code(base: .closed) }

        /// The code's name.
        public var description: String {
            switch base {
            case .closed: "closed"
            }
        }
    }

    /// What went wrong.
    public let code: Code
    /// The element that was not sent.
    public let element: Element

    /// The channel was closed before `element` could be delivered.
    public static func closed(element: Element) -> ChannelError {
        ChannelError(code: .closed, element: element)
    }

    /// A readable description of what went wrong.
    public var description: String {
        switch code.base {
        case .closed:
            "ChannelError.closed: the channel was closed before the element could be sent (the element is returned in `element`)"
        }
    }
}

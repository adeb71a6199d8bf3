@_exported import Corral

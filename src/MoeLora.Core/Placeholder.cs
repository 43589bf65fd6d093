namespace MoeLora.Core;

internal static class Placeholder { }

namespace MoeLora.Sources;

internal static class Placeholder { }

// The smallest program .NET can start: what moelora's cold start is compared with.
System.Console.WriteLine("hello");

namespace MoeLora.Sources.Tests;

/// <summary>The environment is read with huggingface_hub's names, defaults and precedence.</summary>
public class SettingsTests
{
    private static SourceSettings From(Dictionary<string, string> env, Dictionary<string, string>? files = null) =>
        SourceSettings.FromEnvironment(env.GetValueOrDefault, "/home/u", p => files?.GetValueOrDefault(p));

    [Fact]
    public void Defaults_follow_huggingface_hub()
    {
        SourceSettings s = From([]);
        Assert.Equal("/home/u/.cache/huggingface/hub", s.HubCache);
        Assert.Equal("https://huggingface.co", s.Endpoint);
        Assert.Null(s.Token);
        Assert.False(s.Offline);
    }

    [Fact]
    public void Hf_home_and_xdg_move_the_cache_and_hub_cache_overrides_both()
    {
        Assert.Equal("/x/huggingface/hub", From(new() { ["XDG_CACHE_HOME"] = "/x" }).HubCache);
        Assert.Equal("/h/hub", From(new() { ["HF_HOME"] = "/h", ["XDG_CACHE_HOME"] = "/x" }).HubCache);
        Assert.Equal("/c", From(new() { ["HF_HOME"] = "/h", ["HF_HUB_CACHE"] = "/c" }).HubCache);
        Assert.Equal("/home/u/hubcache", From(new() { ["HF_HUB_CACHE"] = "~/hubcache" }).HubCache);
    }

    [Fact]
    public void The_token_comes_from_hf_token_then_the_token_file()
    {
        var files = new Dictionary<string, string> { ["/h/token"] = "hf_file\n", ["/t"] = "hf_path" };
        Assert.Equal("hf_env", From(new() { ["HF_HOME"] = "/h", ["HF_TOKEN"] = "hf_env" }, files).Token);
        Assert.Equal("hf_legacy", From(new() { ["HF_HOME"] = "/h", ["HUGGING_FACE_HUB_TOKEN"] = "hf_legacy" }, files).Token);
        Assert.Equal("hf_file", From(new() { ["HF_HOME"] = "/h" }, files).Token);
        Assert.Equal("hf_path", From(new() { ["HF_HOME"] = "/h", ["HF_TOKEN_PATH"] = "/t" }, files).Token);
        Assert.Null(From(new() { ["HF_HOME"] = "/h", ["HF_TOKEN"] = "hf_env", ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1" }, files).Token);
    }

    [Theory]
    [InlineData("HF_HUB_OFFLINE", "1", true)]
    [InlineData("HF_HUB_OFFLINE", "true", true)]
    [InlineData("HF_HUB_OFFLINE", "ON", true)]
    [InlineData("HF_HUB_OFFLINE", "0", false)]
    [InlineData("TRANSFORMERS_OFFLINE", "yes", true)]
    public void Offline_accepts_huggingface_hub_truthy_values(string name, string value, bool offline) =>
        Assert.Equal(offline, From(new() { [name] = value }).Offline);

    [Fact]
    public void Endpoint_and_timeouts_are_read()
    {
        SourceSettings s = From(new() { ["HF_ENDPOINT"] = "https://mirror.example/", ["HF_HUB_ETAG_TIMEOUT"] = "3", ["HF_HUB_DISABLE_SYMLINKS"] = "1" });
        Assert.Equal("https://mirror.example", s.Endpoint);
        Assert.Equal(TimeSpan.FromSeconds(3), s.RequestTimeout);
        Assert.True(s.DisableSymlinks);
    }
}

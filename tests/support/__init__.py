"""What the tests share: paths, the genflow command, servers, forged outputs, test plugins."""

"""The ways a caller gets recorded at call start: HTTP `/call`, the seed's legacy file, …"""
